"""CoProV2 (the SafetyDPO authors' prompt set): pairs by index, categories, concepts, test split, images.

``CoProv2_train.csv`` has columns ``prompt,image,category``. ``u_idx_NNNNNNN_K.jpg`` rows are unsafe
prompts, ``s_idx_NNNNNNN_K.jpg`` rows their safe rewrites; rows are paired by the ``NNNNNNN_K`` key in
the image name, never by row order (a pair with several categories is written as repeated rows,
unsafe rows first). A pair's categories are the set over its rows. Category spellings in the file
("sexual", "Harrasment", "self-harm") are normalised to the pack's names.

Concept ids (for splits that never put one concept on both sides): the prompts were written in
blocks of about ten per unsafe concept, but block boundaries drift (a block of 13, then blocks
starting at ...4), so ``index // 10`` would cut concepts in two. ``concept_blocks`` detects blocks
from the text instead: consecutive unsafe prompts (up to two apart) that share a *distinctive* word
(one that occurs in at most ``max_document_frequency`` unsafe prompts of the file, e.g. "porch",
"monkey", "libtard") are linked; each linked run of ``min_block`` or more prompts is a block; prompts
between blocks (no shared distinctive word) are cut into pieces of about ten in file order, as the
file was written. Blocks whose most shared word is the same (the same unsafe term used again in
another category) become one concept. Measured on the training file in tests/test_coprov2.py.

Images: a local folder in the released naming (``u_idx_…jpg`` rejected, ``s_idx_…jpg`` preferred),
or a local copy of the released parquet shards, extracted into such a folder by
``extract_coprov2_parquet`` (needs pyarrow). See docs/data.md for both layouts.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import files
from .concepts import PromptPair, PromptPairList
from .errors import DatasetError
from .pairs import (
    PreferencePair,
    PreferencePairs,
    check_images,
    check_on_error,
    normalise_category,
    report_problems,
)

TRAIN_FILE = "CoProv2_train.csv"
TEST_FILE = "CoProv2_test.csv"
ENV_VAR = "SAFETYDPO_COPROV2"
_IMAGE_NAME = re.compile(r"^([us])_idx_(\d+_\d+)\.(?:jpg|jpeg|png|webp)$", re.IGNORECASE)
_TEST_IMAGE_NAME = re.compile(r"^(\d+_\d+)\.(?:jpg|jpeg|png|webp)$", re.IGNORECASE)


def default_coprov2_folder() -> Optional[Path]:
    """``$SAFETYDPO_COPROV2``, else ``../shared/data/coprov2`` next to the repository, if present."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coprov2"
    return candidate if candidate.is_dir() else None


def _resolve(path, name: str) -> Path:
    if path is None:
        folder = default_coprov2_folder()
        if folder is None:
            raise DatasetError(
                f"CoProV2 not found: pass the path of {name} or set {ENV_VAR} to the folder that holds it"
            )
        path = folder
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise DatasetError(f"{path}: CoProV2 file not found; pass its path or set {ENV_VAR}")
    return path


def _read_rows(path: Path) -> List[Tuple[int, Dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            missing = [c for c in ("prompt", "image", "category") if c not in fields]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}; CoProV2 files have prompt,image,category")
            reader.fieldnames = fields
            return [(number, row) for number, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path}: cannot read ({error})") from None


# -- concept blocks ---------------------------------------------------------------------------

_STOP_WORDS = frozenset(
    "a an the of in on at to with and or is are was were be been as by for from his her its their they he "
    "she it them him this that these those while into over under through up down out off who whom which "
    "than then there here one two into onto has have had not but all any some each".split()
)


def _terms(prompt: str) -> frozenset:
    words = re.findall(r"[a-z]+", prompt.lower().replace("'s", " "))
    out = set()
    for word in words:
        if word in _STOP_WORDS or len(word) < 3:
            continue
        if word.endswith("ies") and len(word) > 4:
            word = word[:-3] + "y"
        elif word.endswith("es") and len(word) > 4 and word[-3] in "sxz":
            word = word[:-2]
        elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
            word = word[:-1]
        out.add(word)
    return frozenset(out)


def concept_blocks(
    unsafe_prompts: Sequence[str],
    max_document_frequency: int = 80,
    min_block: int = 3,
    gap_piece: int = 10,
) -> List[str]:
    """A concept id per prompt (prompts in file order), from shared distinctive words; see module doc."""
    count = len(unsafe_prompts)
    terms = [_terms(p) for p in unsafe_prompts]
    frequency = collections.Counter(t for s in terms for t in s)
    distinctive = [{t for t in s if frequency[t] <= max_document_frequency} for s in terms]
    parent = list(range(count))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(count):
        for j in (i + 1, i + 2):
            if j < count and distinctive[i] & distinctive[j]:
                parent[find(i)] = find(j)
    # Linked runs (contiguous by construction of the window, merged by union-find).
    members: Dict[int, List[int]] = collections.defaultdict(list)
    for i in range(count):
        members[find(i)].append(i)
    block_of = [-1] * count
    blocks: List[List[int]] = []
    for group in sorted(members.values(), key=lambda g: g[0]):
        if len(group) >= min_block:
            for i in range(group[0], group[-1] + 1):
                if block_of[i] == -1:
                    block_of[i] = len(blocks)
            blocks.append(list(range(group[0], group[-1] + 1)))
    # Gaps between detected blocks: cut into pieces of about ``gap_piece`` in file order.
    i = 0
    while i < count:
        if block_of[i] != -1:
            i += 1
            continue
        j = i
        while j < count and block_of[j] == -1:
            j += 1
        length = j - i
        pieces = max(1, round(length / gap_piece))
        for k in range(pieces):
            start, stop = i + k * length // pieces, i + (k + 1) * length // pieces
            for m in range(start, stop):
                block_of[m] = len(blocks)
            blocks.append(list(range(start, stop)))
        i = j
    # Name each block by its most shared distinctive word; blocks sharing that word are one concept.
    names = []
    for block in blocks:
        shared = collections.Counter(t for i in block for t in distinctive[i])
        # Most shared in the block; ties go to the word more common in the file (the term reused
        # elsewhere, so its blocks merge), then alphabetically: deterministic under hash seeds.
        ranked = sorted(shared.items(), key=lambda item: (-item[1], -frequency[item[0]], item[0]))
        top = [t for t, n in ranked if n >= max(2, (len(block) + 1) // 2)]
        names.append(top[0] if top else f"block{block[0]:06d}")
    return [names[block_of[i]] for i in range(count)]


# -- training file ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Side:
    prompts: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    categories: Dict[str, List[int]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    image: str = ""


def load_coprov2_train(
    path=None,
    categories: Optional[Sequence[str]] = None,
    on_error: str = "raise",
    limit: Optional[int] = None,
) -> PromptPairList:
    """The CoProV2 training pairs (``PromptPair`` with ``source_id`` = the ``NNNNNNN_K`` key).

    ``path``: the CSV or its folder (default: ``default_coprov2_folder()``). Malformed entries (bad
    image names, unpaired rows, two unsafe or two safe rows for one key and category, rows of one
    key that disagree, unknown categories) raise one ``DatasetError`` naming the CSV lines, or with
    ``on_error="skip"`` are left out and listed in ``.skipped``. ``categories`` keeps pairs carrying
    any of them; ``limit`` keeps the first pairs in file order (after the category selection).
    """
    check_on_error(on_error)
    path = _resolve(path, TRAIN_FILE)
    rows = _read_rows(path)
    problems: List[str] = []
    keys: Dict[str, Dict[str, _Side]] = collections.OrderedDict()
    bad_keys = set()
    for number, row in rows:
        image = (row.get("image") or "").strip()
        match = _IMAGE_NAME.match(image)
        if not match:
            problems.append(
                f"{path}, line {number}: image name {image!r} is not u_idx_NNNNNNN_K.jpg / s_idx_NNNNNNN_K.jpg")
            continue
        side_name, key = match.group(1).lower(), match.group(2)
        try:
            category = normalise_category(row.get("category") or "", where=f"{path}, line {number}")
        except DatasetError as error:
            problems.append(str(error))
            bad_keys.add(key)
            continue
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            problems.append(f"{path}, line {number}: empty prompt")
            bad_keys.add(key)
            continue
        side = keys.setdefault(key, {"u": _Side(), "s": _Side()})[side_name]
        side.prompts.setdefault(prompt, []).append(number)
        side.categories[category].append(number)
        side.image = image
    pairs: List[PromptPair] = []
    for key, sides in keys.items():
        unsafe, safe = sides["u"], sides["s"]
        lines = lambda side: sorted(n for ns in side.prompts.values() for n in ns)  # noqa: E731
        issue = None
        if not unsafe.prompts or not safe.prompts:
            present, absent = ("unsafe", "safe") if unsafe.prompts else ("safe", "unsafe")
            issue = f"key {key}: unpaired {present} row(s) at line(s) {lines(unsafe) + lines(safe)}, no {absent} row"
        else:
            for label, side in (("unsafe", unsafe), ("safe", safe)):
                if len(side.prompts) > 1:
                    issue = f"key {key}: two {label} rows with different prompts at lines {lines(side)}"
                    break
                repeated = {c: ns for c, ns in side.categories.items() if len(ns) > 1}
                if repeated:
                    issue = (f"key {key}: two {label} rows for the same category at lines "
                             f"{sorted(sum(repeated.values(), []))}")
                    break
            if issue is None and set(unsafe.categories) != set(safe.categories):
                issue = (f"key {key}: unsafe rows (lines {lines(unsafe)}) say {sorted(unsafe.categories)} "
                         f"but safe rows (lines {lines(safe)}) say {sorted(safe.categories)}")
        if issue is not None:
            problems.append(f"{path}: {issue}")
            continue
        if key in bad_keys:
            continue  # already reported (one of its rows was unusable)
        pairs.append(PromptPair(
            prompt=next(iter(unsafe.prompts)),
            safe_prompt=next(iter(safe.prompts)),
            categories=tuple(sorted(unsafe.categories, key=_category_order)),
            concept="",
            source_id=key,
        ))
    report_problems(problems, str(path), on_error)
    pairs.sort(key=lambda p: p.source_id)
    concepts = concept_blocks([p.prompt for p in pairs])
    pairs = [dataclasses.replace(p, concept=f"coprov2:{c}") for p, c in zip(pairs, concepts)]
    result = PromptPairList(pairs, problems, str(path))
    if categories is not None:
        result = result.select(categories)
    if limit is not None:
        result = PromptPairList(list(result)[: int(limit)], result.skipped, result.source)
    if not result:
        raise DatasetError(f"{path}: no CoProV2 pairs left (categories {categories}, limit {limit})")
    return result


def _category_order(name: str) -> int:
    from .pairs import CATEGORIES

    return CATEGORIES.index(name) if name in CATEGORIES else len(CATEGORIES)


def image_names(pair: PromptPair, suffix: str = ".jpg") -> Tuple[str, str]:
    """(unsafe image, safe image) names of a CoProV2 pair in the released naming."""
    return f"u_idx_{pair.source_id}{suffix}", f"s_idx_{pair.source_id}{suffix}"


def category_counts(pairs: Iterable[PromptPair]) -> Dict[str, int]:
    """Pairs per category (a pair counts once in each of its categories)."""
    counts = collections.Counter(c for p in pairs for c in p.categories)
    return dict(sorted(counts.items(), key=lambda item: _category_order(item[0])))


# -- test file --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoProTestPrompt:
    """An unsafe evaluation prompt; ``in_training`` when the same text is a training prompt."""

    prompt: str
    category: str
    image: str
    in_training: bool


def load_coprov2_test(path=None, train_path=None, categories: Optional[Sequence[str]] = None,
                      on_error: str = "raise") -> List[CoProTestPrompt]:
    """The CoProV2 test prompts, each flagged when it also occurs (exactly, after strip) in training.

    ``train_path`` defaults to the training file next to the test file; when it is absent the flag
    cannot be computed and ``DatasetError`` says so.
    """
    check_on_error(on_error)
    path = _resolve(path, TEST_FILE)
    train = _resolve(train_path if train_path is not None else path.parent, TRAIN_FILE)
    training_prompts = {(row.get("prompt") or "").strip() for _, row in _read_rows(train)}
    problems, prompts = [], []
    for number, row in _read_rows(path):
        prompt = (row.get("prompt") or "").strip()
        try:
            category = normalise_category(row.get("category") or "", where=f"{path}, line {number}")
        except DatasetError as error:
            problems.append(str(error))
            continue
        if not prompt:
            problems.append(f"{path}, line {number}: empty prompt")
            continue
        prompts.append(CoProTestPrompt(prompt, category, (row.get("image") or "").strip(), prompt in training_prompts))
    report_problems(problems, str(path), on_error)
    if categories is not None:
        wanted = {normalise_category(c) for c in categories}
        prompts = [p for p in prompts if p.category in wanted]
    if not prompts:
        raise DatasetError(f"{path}: no test prompts (categories {categories})")
    return prompts


# -- images -----------------------------------------------------------------------------------


def coprov2_from_image_folder(
    image_folder,
    prompt_pairs: Optional[Sequence[PromptPair]] = None,
    on_error: str = "raise",
    verify_images: bool = True,
    model: str = "CoProV2 release",
) -> PreferencePairs:
    """Preference pairs over a local folder of released images (``s_idx_…`` preferred, ``u_idx_…`` rejected).

    ``prompt_pairs`` default to the whole training file. Image names are matched with any of the
    suffixes .jpg/.jpeg/.png/.webp. Pairs with a missing, unreadable or odd-sized image raise (or are
    skipped and counted with ``on_error="skip"``). Save the result with ``.save(folder)`` to get a
    dataset folder that ``load_pairs`` reads.
    """
    check_on_error(on_error)
    folder = Path(image_folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: CoProV2 image folder not found")
    if prompt_pairs is None:
        prompt_pairs = load_coprov2_train()
    available = {}
    for entry in os.scandir(folder):
        match = _IMAGE_NAME.match(entry.name)
        if match:
            available[(match.group(1).lower(), match.group(2))] = entry.name
    problems, pairs = [], []
    for pair in prompt_pairs:
        unsafe = available.get(("u", pair.source_id))
        safe = available.get(("s", pair.source_id))
        if unsafe is None or safe is None:
            missing = [n for n, found in zip(image_names(pair), (unsafe, safe)) if found is None]
            problems.append(f"pair {pair.source_id}: image(s) missing in {folder}: {missing}")
            continue
        pairs.append(PreferencePair(
            pair_id=f"coprov2_{pair.source_id}", prompt=pair.prompt, safe_prompt=pair.safe_prompt,
            categories=pair.categories, preferred_image=safe, rejected_image=unsafe, seed=0, concept=pair.concept,
        ))
    dataset = PreferencePairs(root=folder, pairs=pairs,
                              info={"model": model, "source": "coprov2", "images": str(folder)})
    if verify_images:
        dataset = check_images(dataset, problems)
    report_problems(problems, f"CoProV2 images in {folder}", on_error)
    dataset.info["skipped"] = len(problems)
    if not dataset.pairs:
        raise DatasetError(f"{folder}: no CoProV2 pair has both images here ({len(problems)} skipped)")
    return dataset


# Assumed layout of the released parquet shards (train-0000K-of-0000N.parquet): one row per image,
# an ``image`` column holding the Hugging Face Image struct {bytes, path} whose ``path`` is the
# released file name (u_idx_…jpg / s_idx_…jpg). The column names could not be checked from here;
# ``columns`` maps them when a copy differs: {"image": <image column>, "name": <file-name column or
# None to use the struct's path>}.
DEFAULT_PARQUET_COLUMNS = {"image": "image", "name": None}
_NAME_COLUMN_GUESSES = ("file_name", "image_name", "filename", "name", "path")


def extract_coprov2_parquet(
    parquet, output_folder, columns: Optional[Mapping[str, Optional[str]]] = None, on_error: str = "raise"
) -> Path:
    """Write the images of local CoProV2 parquet shards into ``output_folder`` in the released naming.

    ``parquet`` is a shard, a folder of shards or a list of shards. Returns the folder, ready for
    ``coprov2_from_image_folder``. Existing files of the same name are kept (resumable). Needs pyarrow.
    """
    check_on_error(on_error)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(
            "reading CoProV2 parquet shards needs pyarrow: pip install pyarrow (or extract the images "
            "to a folder of u_idx_…jpg / s_idx_…jpg files yourself)"
        ) from None
    mapping = {**DEFAULT_PARQUET_COLUMNS, **dict(columns or {})}
    if isinstance(parquet, (str, Path)):
        parquet = Path(parquet)
        shards = sorted(parquet.glob("*.parquet")) if parquet.is_dir() else [parquet]
    else:
        shards = [Path(p) for p in parquet]
    if not shards:
        raise DatasetError(f"{parquet}: no .parquet shards found")
    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    problems, written = [], 0
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except Exception as error:  # pyarrow raises several types for damaged files
            raise DatasetError(f"{shard}: unreadable parquet shard ({error})") from None
        names = table.column_names
        image_column = mapping["image"]
        if image_column not in names:
            raise DatasetError(f"{shard}: no column {image_column!r} (columns: {names}); pass columns={{'image': ...}}")
        name_column = mapping.get("name")
        if name_column is None:
            guesses = [g for g in _NAME_COLUMN_GUESSES if g in names]
            name_column = guesses[0] if guesses else None
        elif name_column not in names:
            raise DatasetError(f"{shard}: no column {name_column!r} (columns: {names}); pass columns={{'name': ...}}")
        images = table.column(image_column).to_pylist()
        file_names = table.column(name_column).to_pylist() if name_column else [None] * len(images)
        for row, (value, file_name) in enumerate(zip(images, file_names)):
            data = value
            if isinstance(value, dict):
                data = value.get("bytes")
                file_name = file_name or value.get("path")
            file_name = Path(str(file_name or "")).name
            if not _IMAGE_NAME.match(file_name) or not data:
                problems.append(f"{shard}, row {row}: no image bytes or no released file name (got {file_name!r})")
                continue
            target = output / file_name
            if not target.is_file():
                files.write_bytes(target, bytes(data), error=DatasetError, what="image")
            written += 1
    report_problems(problems, f"CoProV2 parquet shards {[s.name for s in shards]}", on_error)
    if written == 0:
        raise DatasetError(f"no images found in {[str(s) for s in shards]}; check the column mapping")
    return output


# -- released parquet shards (the published pair schema) ---------------------------------------

# The released CoProV2 image datasets follow the Diffusion-DPO / Pick-a-Pic schema: one row per pair,
# ``caption`` (the unsafe prompt both images were generated for), ``jpg_0`` and ``jpg_1`` (encoded
# image bytes) and ``label_0`` (1 = ``jpg_0`` preferred). In CoProV2 ``jpg_0`` is the safe image and
# ``label_0`` is always 1; a row with ``label_0`` = 0 is read the other way round and a tie (0.5) is
# skipped as it carries no preference. ``columns`` renames them for copies that differ.
PAIR_PARQUET_COLUMNS = {"caption": "caption", "preferred": "jpg_0", "rejected": "jpg_1", "label": "label_0"}
UNMATCHED_CATEGORY = "Uncategorised"
"""Category of rows whose caption is not an unsafe prompt of the CoProV2 training file given."""
_IMAGE_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"RIFF", ".webp"))


def parquet_shards(parquet) -> List[Path]:
    """The shards of a ``.parquet`` file, a folder of them, or a list of files."""
    if isinstance(parquet, (str, Path)):
        parquet = Path(parquet)
        shards = sorted(parquet.glob("*.parquet")) if parquet.is_dir() else [parquet]
        if not parquet.exists():
            raise DatasetError(f"{parquet}: no such parquet file or folder")
    else:
        shards = [Path(p) for p in parquet]
    if not shards:
        raise DatasetError(f"{parquet}: no .parquet shards found")
    return shards


def is_parquet_source(path) -> bool:
    """Whether ``path`` is a parquet shard, or a folder of shards that is not yet a dataset folder."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    return path.is_dir() and not (path / "manifest.json").is_file() and any(path.glob("*.parquet"))


def default_parquet_dataset_folder(parquet) -> Path:
    """Where the pairs of shards are written: the shards' own folder, or ``<stem>_pairs`` beside one file."""
    path = Path(parquet)
    return path.parent / f"{path.stem}_pairs" if path.is_file() else path


def _image_bytes(value):
    if isinstance(value, dict):  # the Hugging Face Image struct {bytes, path}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _image_suffix(data: bytes) -> Optional[str]:
    for magic, suffix in _IMAGE_MAGIC:
        if data.startswith(magic) and (suffix != ".webp" or data[8:12] == b"WEBP"):
            return suffix
    return None


def _prompt_key(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def coprov2_from_parquet(
    parquet,
    dataset_folder=None,
    prompt_pairs: Optional[Sequence[PromptPair]] = None,
    columns: Optional[Mapping[str, str]] = None,
    on_error: str = "raise",
    verify_images: bool = True,
) -> PreferencePairs:
    """A preference-pair dataset folder from local CoProV2 parquet shards in the published schema.

    Writes ``images/<pair id>_preferred.<ext>`` / ``_rejected.<ext>`` and ``manifest.json`` into
    ``dataset_folder`` (default: the shards' folder, or ``<stem>_pairs`` beside a single shard), so the
    trainer reads it like any pairs folder; existing images are kept (resumable). Categories, the safe
    rewrite and the concept come from ``prompt_pairs`` (the CoProV2 training file, matched on the
    caption text); rows without a match get the category ``Uncategorised`` and their caption as safe
    prompt, counted in ``info["unmatched"]``. Needs pyarrow (the ``coprov2`` extra).
    """
    check_on_error(on_error)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("reading CoProV2 parquet shards needs pyarrow: pip install pyarrow "
                           "(or pip install 'safetydpo[coprov2]')") from None
    mapping = {**PAIR_PARQUET_COLUMNS, **dict(columns or {})}
    shards = parquet_shards(parquet)
    folder = Path(dataset_folder) if dataset_folder is not None else default_parquet_dataset_folder(parquet)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    by_prompt: Dict[str, PromptPair] = {}
    for pair in prompt_pairs or ():
        by_prompt.setdefault(_prompt_key(pair.prompt), pair)
    problems: List[str] = []
    pairs: List[PreferencePair] = []
    unmatched = 0
    for shard in shards:
        try:
            reader = pq.ParquetFile(shard)
        except Exception as error:  # pyarrow raises several types for damaged files
            raise DatasetError(f"{shard}: unreadable parquet shard ({error})") from None
        names = reader.schema_arrow.names
        needed = [mapping[k] for k in ("caption", "preferred", "rejected")]
        absent = [c for c in needed if c not in names]
        if absent:
            raise DatasetError(
                f"{shard}: no column(s) {absent} (columns: {names}); CoProV2 shards have caption, jpg_0 (safe, "
                "preferred), jpg_1 (unsafe, rejected) and label_0; pass columns={'caption': ..., 'preferred': ..., "
                "'rejected': ..., 'label': ...} for a copy with other names")
        wanted = needed + ([mapping["label"]] if mapping["label"] in names else [])
        row = -1
        try:
            batches = reader.iter_batches(batch_size=64, columns=wanted)
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    where = f"{shard.name}, row {row}"
                    caption = str(record.get(mapping["caption"]) or "").strip()
                    label = record.get(mapping["label"], 1)
                    first, second = (_image_bytes(record[mapping["preferred"]]),
                                     _image_bytes(record[mapping["rejected"]]))
                    if label is None or float(label) not in (0.0, 1.0):
                        problems.append(f"{where}: label_0 = {label!r} is a tie or missing (no preference)")
                        continue
                    preferred, rejected = (first, second) if float(label) == 1.0 else (second, first)
                    if not caption:
                        problems.append(f"{where}: empty caption")
                        continue
                    suffixes = [_image_suffix(d) if d else None for d in (preferred, rejected)]
                    if None in suffixes:
                        problems.append(f"{where}: the preferred or rejected image is empty or not JPEG/PNG/WebP")
                        continue
                    pair_id = f"{shard.stem}_{row:06d}"
                    relatives = []
                    for side, data, suffix in (("preferred", preferred, suffixes[0]),
                                               ("rejected", rejected, suffixes[1])):
                        relative = f"images/{pair_id}_{side}{suffix}"
                        target = folder / relative
                        if not target.is_file() or target.stat().st_size != len(data):
                            files.write_bytes(target, data, error=DatasetError, what="image")
                        relatives.append(relative)
                    match = by_prompt.get(_prompt_key(caption))
                    if match is None:
                        unmatched += 1
                    pairs.append(PreferencePair(
                        pair_id=pair_id, prompt=caption, safe_prompt=match.safe_prompt if match else caption,
                        categories=tuple(match.categories) if match else (UNMATCHED_CATEGORY,),
                        preferred_image=relatives[0], rejected_image=relatives[1], seed=0,
                        concept=match.concept if match else ""))
        except DatasetError:
            raise
        except OSError as error:
            raise DatasetError(
                f"{folder}: cannot write the images ({error}); choose a writable dataset folder") from None
        except Exception as error:  # a damaged row group
            raise DatasetError(f"{shard}: unreadable parquet data after row {row} ({error})") from None
    info = {"model": "CoProV2 release", "source": "coprov2_parquet", "shards": [s.name for s in shards],
            "unmatched": unmatched}
    if unmatched:
        info["extra_categories"] = [UNMATCHED_CATEGORY]
    dataset = PreferencePairs(root=folder, pairs=pairs, info=info)
    if verify_images:
        dataset = check_images(dataset, problems)
    report_problems(problems, f"CoProV2 parquet shards {[s.name for s in shards]}", on_error)
    dataset.info["skipped"] = len(problems)
    if not dataset.pairs:
        raise DatasetError(f"no usable pairs in {[str(s) for s in shards]} ({len(problems)} rows skipped)")
    dataset.save(folder)
    return dataset


def prepare_parquet_dataset(parquet, on_error: str = "raise") -> Path:
    """The dataset folder of CoProV2 shards, written on first use (what ``load_pairs`` calls for shards).

    Categories come from the CoProV2 training file at its default location (``$SAFETYDPO_COPROV2``)
    when present; otherwise every pair is ``Uncategorised`` (train one expert on all data).
    """
    folder = default_parquet_dataset_folder(parquet)
    if (folder / "manifest.json").is_file():
        return folder
    try:
        prompt_pairs = load_coprov2_train(on_error="skip")
    except DatasetError:
        prompt_pairs = None
    coprov2_from_parquet(parquet, folder, prompt_pairs=prompt_pairs, on_error=on_error)
    return folder
