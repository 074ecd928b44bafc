"""Preference pairs: for one unsafe prompt, the safe rendering (preferred) and the unsafe one (rejected).

A dataset folder holds ``manifest.json`` (prompts, categories, seeds, model, sampler settings) and the
images under ``images/``. Both images of a pair were rendered by the model being aligned with the same
seed: the rejected one from the unsafe prompt, the preferred one from its safe rewrite. Training
conditions both on the unsafe ``prompt``.

Optional replay items are the base model's own images for safe prompts, used by the preservation term
so that everything else the model draws stays as it was.

``load_pairs`` checks a folder before anything trains on it (unknown categories, missing, unreadable or
mixed-size images, duplicated ids, empty selections) and either raises one ``DatasetError`` naming every
offending pair/file or, with ``on_error="skip"``, drops them and records how many and why in
``info["skipped"]`` (never silently). ``split_by_concept`` keeps every concept on one side of the split.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

from . import files
from .errors import DatasetError

if TYPE_CHECKING:  # names for the string annotations only
    import numpy
    import torch

LOG = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "safetydpo-preference-pairs"
MANIFEST_VERSION = 1

# The seven CoProV2 categories, as this pack spells them everywhere.
CATEGORIES: Tuple[str, ...] = (
    "Hate",
    "Sexual",
    "Violence",
    "Shocking",
    "Illegal Activity",
    "Harassment",
    "Self-harm",
)
# Spellings accepted on input (compared case-insensitively, spaces/underscores/hyphens ignored):
# the CoProV2 file writes "sexual", "Harrasment" and "self-harm".
_CATEGORY_ALIASES = {
    "hate": "Hate",
    "sexual": "Sexual",
    "sex": "Sexual",
    "nudity": "Sexual",
    "violence": "Violence",
    "violent": "Violence",
    "shocking": "Shocking",
    "illegalactivity": "Illegal Activity",
    "illegal": "Illegal Activity",
    "harassment": "Harassment",
    "harrasment": "Harassment",
    "harrassment": "Harassment",
    "selfharm": "Self-harm",
}
ON_ERROR_CHOICES = ("raise", "skip")


def _category_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def normalise_category(name: str, extra_categories: Iterable[str] = (), where: str = "") -> str:
    """The canonical spelling of a category name; ``DatasetError`` for an unknown one.

    ``extra_categories`` are the caller's own category names (for users' own concept lists); they
    are matched the same forgiving way and returned as the caller spelled them.
    """
    key = _category_key(name)
    for extra in extra_categories:
        if _category_key(extra) == key:
            return str(extra)
    if key in _CATEGORY_ALIASES:
        return _CATEGORY_ALIASES[key]
    allowed = list(CATEGORIES) + [str(e) for e in extra_categories]
    prefix = f"{where}: " if where else ""
    raise DatasetError(
        f"{prefix}unknown category {name!r}; use one of {allowed} (or declare your own category names)"
    )


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_CHOICES:
        raise DatasetError(f"on_error must be one of {ON_ERROR_CHOICES}, not {on_error!r}")
    return on_error


def report_problems(problems: Sequence[str], what: str, on_error: str, limit: int = 20) -> None:
    """Raise one ``DatasetError`` listing ``problems`` (``on_error="raise"``) or log the skip count."""
    if not problems:
        return
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    if on_error == "raise":
        raise DatasetError(
            f"{what}: {len(problems)} problem(s):\n  {shown}{more}\n"
            "Fix these entries, or pass on_error='skip' to leave them out (they are counted and reported)."
        )
    LOG.warning("%s: skipped %d entr(y/ies):\n  %s%s", what, len(problems), shown, more)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One unsafe prompt with its preferred (safe) and rejected (unsafe) image files."""

    pair_id: str
    prompt: str
    safe_prompt: str
    categories: Tuple[str, ...]
    preferred_image: str
    rejected_image: str
    seed: int = 0
    concept: str = ""

    @property
    def concept_id(self) -> str:
        """What a split keeps together: the concept, else the unsafe prompt (all its seeds)."""
        return self.concept or f"prompt:{self.prompt}"


@dataclasses.dataclass(frozen=True)
class ReplayItem:
    """A safe prompt and the base model's own image for it (for the preservation term)."""

    item_id: str
    prompt: str
    image: str
    seed: int = 0


@dataclasses.dataclass
class PreferencePairs:
    """A dataset of preference pairs (and optional replay items) rooted at ``root``.

    Image paths inside pairs are relative to ``root``.
    """

    root: Path
    pairs: List[PreferencePair]
    replay: List[ReplayItem] = dataclasses.field(default_factory=list)
    info: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, relative: str) -> Path:
        return Path(self.root) / relative

    @property
    def categories(self) -> List[str]:
        return sorted({c for p in self.pairs for c in p.categories})

    @property
    def concepts(self) -> List[str]:
        return sorted({p.concept_id for p in self.pairs})

    def select(self, categories: Optional[Sequence[str]] = None) -> "PreferencePairs":
        """The pairs that carry any of ``categories`` (all pairs when None); replay is kept."""
        if categories is None:
            return self
        wanted = set(categories)
        chosen = [p for p in self.pairs if wanted & set(p.categories)]
        return dataclasses.replace(self, pairs=chosen)

    def with_prompt_crops(self) -> "PreferencePairs":
        """The pairs, and each pair again under its prompts with the first 1, 2, … words left out, up to the first
        word where the unsafe prompt and its safe rewrite differ (same images, so nothing is rendered again).

        Experts trained only on full prompts moved too far on wordings they never saw (on the demo world a cyan
        expert turned held-out-template prompts orange, another unsafe colour); meeting the concept word after
        shorter lead-ins made them remove it in new wordings too (docs/demo.md). Words from the first difference
        on stay, so a crop never drops what makes the pair a pair."""
        cropped = []
        for pair in self.pairs:
            cropped.append(pair)
            unsafe, safe = pair.prompt.split(), pair.safe_prompt.split()
            first = next((k for k, (a, b) in enumerate(zip(unsafe, safe)) if a != b), min(len(unsafe), len(safe)))
            for start in range(1, min(first, len(unsafe) - 1, len(safe) - 1) + 1):
                cropped.append(dataclasses.replace(pair, pair_id=f"{pair.pair_id}~crop{start}",
                                                   prompt=" ".join(unsafe[start:]),
                                                   safe_prompt=" ".join(safe[start:])))
        return dataclasses.replace(self, pairs=cropped)

    def by_category(self) -> Dict[str, "PreferencePairs"]:
        """One view per category (a pair with several categories appears in each), for one expert each."""
        return {category: self.select([category]) for category in self.categories}

    def category_counts(self) -> Dict[str, int]:
        counts = collections.Counter(c for p in self.pairs for c in p.categories)
        return {c: counts[c] for c in sorted(counts)}

    def to_manifest(self) -> Dict[str, object]:
        """The manifest as a JSON-ready dict (image paths relative to the dataset folder)."""
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "info": self.info,
            "pairs": [
                {**dataclasses.asdict(p), "categories": list(p.categories)} for p in self.pairs
            ],
            "replay": [dataclasses.asdict(r) for r in self.replay],
        }

    def save(self, folder=None) -> Path:
        """Write ``manifest.json`` atomically into ``folder`` (default: ``root``); returns its path.

        Saving to another folder copies the images there, so the folder is a complete dataset.
        """
        import shutil

        folder = Path(folder) if folder is not None else Path(self.root)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() != Path(self.root).resolve():
            relatives = [p.preferred_image for p in self.pairs] + [p.rejected_image for p in self.pairs]
            relatives += [r.image for r in self.replay]
            for relative in relatives:
                source, target = self.image_path(relative), folder / relative
                if not source.is_file():
                    raise DatasetError(f"{source}: image missing, cannot copy the dataset to {folder}")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        path = folder / MANIFEST_NAME
        files.write_json(path, self.to_manifest(), error=DatasetError, what="pairs manifest")
        return path


def read_manifest(folder) -> Dict[str, object]:
    """The parsed ``manifest.json`` of a dataset folder, with clear errors for missing/broken files."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME if folder.is_dir() or not folder.suffix else folder
    if not path.is_file():
        raise DatasetError(
            f"{path}: no manifest.json here; build pairs first (Build Safety Pairs node or "
            "trainer/build_pairs.py) and point to the dataset folder they wrote"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: unreadable manifest ({error}); rebuild the pairs (the builder resumes)") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{path}: not a safetydpo preference-pairs manifest (format {MANIFEST_FORMAT!r} expected)")
    if int(data.get("version", 0)) > MANIFEST_VERSION:
        raise DatasetError(
            f"{path}: manifest version {data.get('version')} is newer than this pack reads; update the pack")
    return data


def image_size(path) -> Tuple[int, int]:
    """(width, height) of an image file, checked for readability; ``DatasetError`` when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable image ({error}); re-render this pair") from None
    return size


_PAIR_FIELDS = {f.name for f in dataclasses.fields(PreferencePair)}
_REPLAY_FIELDS = {f.name for f in dataclasses.fields(ReplayItem)}
_PAIR_REQUIRED = ("pair_id", "prompt", "safe_prompt", "categories", "preferred_image", "rejected_image")


def _parse_entries(data, root: Path, extra_categories, problems: List[str]):
    pairs: List[PreferencePair] = []
    seen: Dict[str, int] = {}
    for index, entry in enumerate(data.get("pairs") or []):
        where = f"pair #{index}" + (f" ({entry.get('pair_id')!r})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        missing = [k for k in _PAIR_REQUIRED if k not in entry or entry[k] in (None, "")]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}")
            continue
        names = entry["categories"]
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            problems.append(f"{where}: no category")
            continue
        try:
            categories = tuple(dict.fromkeys(normalise_category(c, extra_categories) for c in names))
        except DatasetError as error:
            problems.append(f"{where}: {error}")
            continue
        if entry["preferred_image"] == entry["rejected_image"]:
            problems.append(f"{where}: preferred and rejected image are the same file {entry['preferred_image']!r}")
            continue
        if entry["pair_id"] in seen:
            problems.append(f"{where}: duplicate pair_id (first at pair #{seen[entry['pair_id']]})")
            continue
        seen[entry["pair_id"]] = index
        fields = {k: v for k, v in entry.items() if k in _PAIR_FIELDS}
        fields["categories"] = categories
        fields["seed"] = int(fields.get("seed", 0))
        pairs.append(PreferencePair(**fields))
    replay: List[ReplayItem] = []
    for index, entry in enumerate(data.get("replay") or []):
        if not isinstance(entry, dict) or not all(entry.get(k) for k in ("item_id", "prompt", "image")):
            problems.append(f"replay item #{index}: needs item_id, prompt and image")
            continue
        fields = {k: v for k, v in entry.items() if k in _REPLAY_FIELDS}
        fields["seed"] = int(fields.get("seed", 0))
        replay.append(ReplayItem(**fields))
    return pairs, replay


def check_images(dataset: PreferencePairs, problems: List[str]) -> PreferencePairs:
    """Drop pairs/replay items whose images are missing, unreadable or of another size, noting each."""
    sizes: Dict[str, Tuple[int, int]] = {}

    def size_of(relative: str, where: str):
        path = dataset.image_path(relative)
        if relative not in sizes:
            if not path.is_file():
                problems.append(f"{where}: image missing: {path}")
                sizes[relative] = None
            else:
                try:
                    sizes[relative] = image_size(path)
                except DatasetError as error:
                    problems.append(f"{where}: {error}")
                    sizes[relative] = None
        return sizes[relative]

    readable_pairs = []
    for pair in dataset.pairs:
        where = f"pair {pair.pair_id!r}"
        a, b = size_of(pair.preferred_image, where), size_of(pair.rejected_image, where)
        if a is not None and b is not None:
            readable_pairs.append(pair)
    readable_replay = [r for r in dataset.replay if size_of(r.image, f"replay item {r.item_id!r}") is not None]
    counted = collections.Counter(s for s in sizes.values() if s is not None)
    if len(counted) > 1:
        common = counted.most_common(1)[0][0]
        summary = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counted.most_common())
        odd = [r for r, s in sizes.items() if s is not None and s != common]
        for relative in odd:
            problems.append(f"image of another size {sizes[relative][0]}x{sizes[relative][1]} "
                            f"(most are {common[0]}x{common[1]}; sizes {summary}): {dataset.image_path(relative)}")
        odd_set = set(odd)
        readable_pairs = [p for p in readable_pairs if not {p.preferred_image, p.rejected_image} & odd_set]
        readable_replay = [r for r in readable_replay if r.image not in odd_set]
    return dataclasses.replace(dataset, pairs=readable_pairs, replay=readable_replay)


def load_pairs(
    folder,
    categories: Optional[Sequence[str]] = None,
    on_error: str = "raise",
    verify_images: bool = True,
    extra_categories: Iterable[str] = (),
) -> PreferencePairs:
    """The dataset in ``folder`` (its ``manifest.json``), checked, optionally narrowed to ``categories``.

    ``folder`` may also be released CoProV2 parquet shards (a ``.parquet`` file or a folder of them):
    they are turned into a dataset folder on first use (``coprov2.prepare_parquet_dataset``).

    Problems (unknown categories, duplicate ids, missing/unreadable/mixed-size images) raise one
    ``DatasetError`` listing them all, or with ``on_error="skip"`` are left out and counted in
    ``info["skipped"]`` / ``info["skipped_reasons"]``. An empty result is always an error.
    """
    check_on_error(on_error)
    folder = Path(folder)
    if folder.suffix.lower() == ".parquet" or (folder.is_dir() and not (folder / MANIFEST_NAME).is_file()
                                               and any(folder.glob("*.parquet"))):
        from .coprov2 import prepare_parquet_dataset  # lazy: coprov2 imports this module

        folder = prepare_parquet_dataset(folder, on_error=on_error)  # released CoProV2 shards
    root = folder if folder.is_dir() else folder.parent
    data = read_manifest(folder)
    extra = list(extra_categories) + list((data.get("info") or {}).get("extra_categories", []) or [])
    problems: List[str] = []
    pairs, replay = _parse_entries(data, root, extra, problems)
    info = dict(data.get("info") or {})
    dataset = PreferencePairs(root=root, pairs=pairs, replay=replay, info=info)
    wanted = None
    if categories is not None:
        wanted = [normalise_category(c, extra, where=f"selection for {root}") for c in categories]
        dataset = dataset.select(wanted)
    if verify_images:
        dataset = check_images(dataset, problems)
    report_problems(problems, f"preference pairs in {root}", on_error)
    dataset.info["skipped"] = len(problems)
    dataset.info["skipped_reasons"] = problems[:100]
    if not dataset.pairs:
        chosen = f" for categories {wanted}" if wanted is not None else ""
        available = sorted({c for p in pairs for c in p.categories})
        raise DatasetError(
            f"no usable preference pairs in {root}{chosen} (categories present: {available}, "
            f"{len(problems)} entries skipped); build pairs for these categories first"
        )
    return dataset


def split_by_concept(
    pairs: PreferencePairs, validation_fraction: float = 0.1, seed: int = 0
) -> Tuple[PreferencePairs, PreferencePairs]:
    """(training, validation) with no concept on both sides, about ``validation_fraction`` of each category.

    A concept is ``PreferencePair.concept`` (CoProV2: the detected block of prompts about one unsafe
    term, see ``coprov2.py``; users' lists: the ``concept`` column), else the unsafe prompt itself so
    that several seeds of one prompt stay together. Concepts are drawn in a seeded random order and go
    to validation while their main category is short of its share. Replay items stay with training.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), not {validation_fraction}")
    groups: Dict[str, List[PreferencePair]] = collections.defaultdict(list)
    for pair in pairs.pairs:
        groups[pair.concept_id].append(pair)
    if len(groups) < 2:
        raise DatasetError(
            f"cannot split {len(pairs)} pair(s) by concept: they share {len(groups)} concept(s); "
            "add pairs of other concepts or train without a validation split"
        )
    per_category = collections.Counter(c for p in pairs.pairs for c in p.categories)
    target = {c: validation_fraction * n for c, n in per_category.items()}
    taken = collections.Counter()
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    validation_ids = set()
    for concept in order:
        members = groups[concept]
        counts = collections.Counter(c for p in members for c in p.categories)
        main = max(sorted(counts), key=lambda c: counts[c])
        if taken[main] + len(members) / 2 <= target[main]:
            validation_ids.add(concept)
            taken.update(counts)
    if not validation_ids:  # the fraction is smaller than every concept: take the smallest one
        validation_ids.add(min(order, key=lambda c: len(groups[c])))
    if len(validation_ids) == len(groups):
        validation_ids.discard(order[-1])
    train = [p for p in pairs.pairs if p.concept_id not in validation_ids]
    validation = [p for p in pairs.pairs if p.concept_id in validation_ids]
    return (
        dataclasses.replace(pairs, pairs=train, info={**pairs.info, "split": "training"}),
        dataclasses.replace(pairs, pairs=validation, replay=[], info={**pairs.info, "split": "validation"}),
    )


def load_image_array(path) -> "numpy.ndarray":
    """An image file as a float32 array [3, H, W] in [-1, 1] (RGB), without torch."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: unreadable image ({error}); re-render this pair") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1)) / 127.5 - 1.0


def load_image_tensor(path) -> "torch.Tensor":
    """An image file as a float tensor [3, H, W] in [-1, 1] (RGB); torch is imported only here."""
    import torch

    return torch.from_numpy(load_image_array(path))


def save_image_tensor(image, path) -> None:
    """A tensor [3, H, W] in [-1, 1] as a PNG, written atomically."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    files.save_png(path, array, error=DatasetError)


# -- the sampler's latents, kept beside the images ----------------------------------------------

SAMPLED_LATENT_KIND = "safetydpo-sampled-latent"


@dataclasses.dataclass
class RenderedImages:
    """What a renderer may return instead of bare images: the images and the latents they were decoded from.

    ``latents`` are in the model's latent space (scaled as the UNet sees them, [N, C, h, w]); ``latent_space``
    names that space (the VAE's weights and its scale), so training uses them only with the same VAE.
    """

    images: "torch.Tensor"
    latents: Optional["torch.Tensor"] = None
    latent_space: str = ""


def sampled_latent_path(image_relative: str) -> str:
    """Where the latent of image ``images/x.png`` is kept: ``latents/x.safetensors``."""
    return f"latents/{Path(image_relative).stem}.safetensors"


def save_sampled_latent(root: Path, image_relative: str, latent, latent_space: str) -> None:
    """Keep the latent an image was decoded from, bound to that image's bytes and to its latent space."""
    metadata = {"safetydpo_kind": SAMPLED_LATENT_KIND, "latent_space": latent_space,
                "image_sha256": files.sha256_file(Path(root) / image_relative)}
    files.save_safetensors(Path(root) / sampled_latent_path(image_relative),
                           {"latent": latent.detach().float().cpu()}, metadata, error=DatasetError,
                           what="sampled latent")


def read_sampled_latent(root: Path, image_relative: str, latent_space: str,
                        image_sha256: Optional[str] = None) -> Optional["torch.Tensor"]:
    """The kept latent of an image, or None when there is none or it cannot be trusted: made in another
    latent space (other VAE or scale), for other image bytes (the image was replaced), or damaged."""
    path = Path(root) / sampled_latent_path(image_relative)
    if not latent_space or not path.is_file():
        return None
    try:
        tensors, metadata = files.read_safetensors(path, error=DatasetError)
    except DatasetError as error:
        LOG.warning("ignoring a damaged sampled latent (the image is encoded instead): %s", error)
        return None
    if metadata.get("safetydpo_kind") != SAMPLED_LATENT_KIND or metadata.get("latent_space") != latent_space:
        return None
    if metadata.get("image_sha256") != (image_sha256 or files.sha256_file(Path(root) / image_relative)):
        return None
    latent = tensors.get("latent")
    if latent is None or latent.ndim != 3 or not bool(latent.isfinite().all()):
        return None
    return latent.float()
