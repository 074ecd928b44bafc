"""Encode preference pairs once (VAE latents, text embeddings) and cache them on disk.

The DPO loop then never runs the VAE or the text encoders again for a pair: every later step reads
cached tensors. With ``lazy=True`` a pair is encoded the first time a batch uses it (so a short run
never waits for the whole set to be encoded up front, and never does more encoding than the official
loop, which encodes every batch); the disk cache is written once every item has been encoded. The
cache is a safetensors file keyed by a hash of the model identity, the prompts and the image files'
bytes; a corrupt or stale entry is rebuilt, never trusted.

Images whose pair builder kept the sampler's latents (``latents/`` beside ``images/``) are not encoded
at all when the encoder works in the same latent space (same VAE weights and scale, as the encoder's
``latent_space`` names it) and the image bytes are the ones the latent was decoded to: training on a
freshly built dataset then never runs the VAE.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import files
from .errors import DatasetError, LoraFormatError
from .models import PromptEmbeddings
from .pairs import PreferencePairs, load_image_tensor, read_sampled_latent, sampled_latent_path
from .training_config import EncodedPreferenceData

CACHE_VERSION = "1"


def _model_identity(bundle) -> str:
    digest = hashlib.sha256(f"{bundle.name}|{bundle.architecture}|{bundle.resolution}".encode())
    for module in [*bundle.text_encoders, bundle.vae, bundle.unet]:
        if module is None:
            continue
        first = next(iter(module.state_dict().values()))
        digest.update(first.detach().float().reshape(-1)[:4096].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def module_fingerprint(*modules, label: str = "") -> str:
    """A short hash of some weights of each module: tells models apart for cache keys."""
    digest = hashlib.sha256(label.encode())
    for module in modules:
        if module is None:
            continue
        for index, value in enumerate(module.state_dict().values()):
            if index >= 3:
                break
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().float().reshape(-1)[:4096].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def vae_fingerprint(vae, scale: float, label: str) -> str:
    """A latent space's name for kept sampler latents: the VAE's weights (at half precision, so that an fp16
    and an fp32 load of the same file agree) and the latent scale."""
    digest = hashlib.sha256(f"{label}|{float(scale)!r}".encode())
    for index, value in enumerate(vae.state_dict().values()):
        if index >= 4:
            break
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().reshape(-1)[:4096].cpu().half().numpy().tobytes())
    return f"{label}|{digest.hexdigest()[:16]}"


def _cache_key(bundle, pairs: PreferencePairs, identity: Optional[str] = None) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    digest.update((identity or _model_identity(bundle)).encode())
    for pair in pairs.pairs:
        digest.update(json.dumps([pair.pair_id, pair.prompt, pair.preferred_image, pair.rejected_image]).encode())
        for rel in (pair.preferred_image, pair.rejected_image):
            _digest_image(digest, pairs, rel)
    for item in pairs.replay:
        digest.update(json.dumps([item.item_id, item.prompt, item.image]).encode())
        _digest_image(digest, pairs, item.image)
    return digest.hexdigest()[:24]


def _digest_image(digest, pairs: PreferencePairs, relative: str) -> None:
    """The image's bytes, and those of its kept sampler latent (whether it is used changes the encoding)."""
    for path in (pairs.image_path(relative), pairs.image_path(sampled_latent_path(relative))):
        if path.is_file():
            digest.update(bytes.fromhex(files.sha256_file(path)))


def latent_space_of(encoder) -> str:
    """The encoder's latent space name (``latent_space``: attribute or method), "" when it has none."""
    space = getattr(encoder, "latent_space", "")
    return str((space() if callable(space) else space) or "")


def load_images(pairs: PreferencePairs, relative_paths: Sequence[str]) -> torch.Tensor:
    """Images as one tensor [N, 3, H, W] in [-1, 1]; clear errors for missing files and mixed sizes."""
    missing = [p for p in relative_paths if not pairs.image_path(p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) of the dataset in {pairs.root} are missing, e.g. {missing[:5]}; "
                           "rebuild the pairs (the builder resumes) or fix the paths in manifest.json")
    images = [load_image_tensor(pairs.image_path(p)) for p in relative_paths]
    sizes = {}
    for rel, image in zip(relative_paths, images):
        sizes.setdefault(tuple(image.shape[1:]), []).append(rel)
    if len(sizes) > 1:
        summary = "; ".join(f"{h}x{w}: {len(v)} (e.g. {v[0]})" for (h, w), v in sizes.items())
        raise DatasetError(f"images of mixed sizes in {pairs.root}: {summary}. Render all pairs at one resolution.")
    return torch.stack(images)


def encode_preference_pairs(bundle, pairs: PreferencePairs, cache_dir: Optional[Path] = None,
                            identity: Optional[str] = None, lazy: bool = False) -> EncodedPreferenceData:
    """Latents and embeddings for every pair (and replay item), from the cache when it is valid.

    ``bundle`` is anything with ``encode_prompts(list) -> PromptEmbeddings`` and ``encode_images(
    [B, 3, H, W] in [-1, 1]) -> latents`` (a ``DiffusionBundle``, or the ComfyUI node's encoder, which
    passes its own model ``identity`` for the cache key); its ``latent_space``, if it names one, lets kept
    sampler latents stand in for encoding (module docstring). ``lazy``: return a
    ``LazyEncodedPreferenceData`` that encodes each item on first use (files and sizes are still
    checked now, so bad data fails before training starts).
    """
    if len(pairs) == 0:
        raise DatasetError(f"the dataset in {pairs.root} has no pairs (or the selection is empty)")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"encoded_{_cache_key(bundle, pairs, identity)}.safetensors"
        if cache_file.is_file():
            try:
                return _read_cache(cache_file)
            except (LoraFormatError, KeyError, ValueError):
                cache_file.unlink(missing_ok=True)  # corrupt: rebuild
    data = LazyEncodedPreferenceData(bundle, pairs, cache_file)
    return data if lazy else data.materialize()


def _write_cache(path: Path, data: EncodedPreferenceData) -> None:
    tensors = {"winner_latents": data.winner_latents, "loser_latents": data.loser_latents,
               "embeddings.hidden": data.embeddings.encoder_hidden_states}
    tensors.update({f"embeddings.added.{k}": v for k, v in data.embeddings.added_cond.items()})
    if data.replay_latents is not None:
        tensors["replay_latents"] = data.replay_latents
        tensors["replay_embeddings.hidden"] = data.replay_embeddings.encoder_hidden_states
        tensors.update({f"replay_embeddings.added.{k}": v for k, v in data.replay_embeddings.added_cond.items()})
    files.save_safetensors(path, tensors, {"version": CACHE_VERSION}, what="encoding cache")


def _read_cache(path: Path) -> EncodedPreferenceData:
    from .files import read_safetensors

    tensors, metadata = read_safetensors(path)
    if metadata.get("version") != CACHE_VERSION:
        raise ValueError("stale cache version")

    def embeddings(prefix):
        added = {k[len(prefix) + len(".added."):]: v for k, v in tensors.items() if k.startswith(prefix + ".added.")}
        return PromptEmbeddings(tensors[prefix + ".hidden"], added)

    data = EncodedPreferenceData(tensors["winner_latents"], tensors["loser_latents"], embeddings("embeddings"))
    if "replay_latents" in tensors:
        data.replay_latents = tensors["replay_latents"]
        data.replay_embeddings = embeddings("replay_embeddings")
    return data


# -- encode on first use -------------------------------------------------------------------------

def _image_size(path: Path):
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.size[1], image.size[0]


def check_images(pairs: PreferencePairs, relative_paths: Sequence[str]) -> None:
    """The checks ``load_images`` makes (missing files, mixed sizes), from file headers only."""
    missing = [p for p in relative_paths if not pairs.image_path(p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) of the dataset in {pairs.root} are missing, e.g. {missing[:5]}; "
                           "rebuild the pairs (the builder resumes) or fix the paths in manifest.json")
    sizes = {}
    for rel in relative_paths:
        try:
            size = _image_size(pairs.image_path(rel))
        except OSError as error:
            raise DatasetError(f"{pairs.image_path(rel)}: unreadable image ({error}); re-render this pair") from None
        sizes.setdefault(size, []).append(rel)
    if len(sizes) > 1:
        summary = "; ".join(f"{h}x{w}: {len(v)} (e.g. {v[0]})" for (h, w), v in sizes.items())
        raise DatasetError(f"images of mixed sizes in {pairs.root}: {summary}. Render all pairs at one resolution.")


class _LazyEncoder:
    """Per-item latents and prompt embeddings, encoded on first request and kept in memory."""

    def __init__(self, bundle, pairs: PreferencePairs, cache_file: Optional[Path]):
        self.bundle, self.pairs, self.cache_file = bundle, pairs, cache_file
        self.items = {
            "pairs": [(p.prompt, p.preferred_image, p.rejected_image) for p in pairs.pairs],
            "replay": [(r.prompt, r.image, None) for r in pairs.replay],
        }
        self.latents = {"pairs": {}, "replay": {}}  # row -> (first, second or None)
        self.images = {}  # image path -> latent (pairs that share images, e.g. prompt crops, encode them once)
        self.prompts = {}  # prompt -> PromptEmbeddings of one row
        self.encoded_images = 0
        self.kept_images = 0  # images whose sampler latents were read instead of encoded
        self.latent_space = latent_space_of(bundle)

    def rows(self, kind: str, rows: Sequence[int]):
        """Encode the rows not seen yet (all new images of the batch in one VAE call, new prompts in one)."""
        cache = self.latents[kind]
        missing = [r for r in dict.fromkeys(rows) if r not in cache]
        if missing:
            items = self.items[kind]
            paths = [p for p in dict.fromkeys(path for r in missing for path in items[r][1:] if path is not None)
                     if p not in self.images]
            kept = self._kept_latents(paths)
            paths = [p for p in paths if p not in kept]
            with torch.no_grad():
                if paths:
                    latents = self.bundle.encode_images(load_images(self.pairs, paths)).float().cpu()
                    self._check_shapes(kept, latents)
                    self.images.update(zip(paths, latents))
                prompts = [p for p in dict.fromkeys(items[r][0] for r in missing) if p not in self.prompts]
                if prompts:
                    embedded = self.bundle.encode_prompts(prompts).to("cpu", torch.float32)
                    for index, prompt in enumerate(prompts):
                        self.prompts[prompt] = embedded.index(slice(index, index + 1))
            self.encoded_images += len(paths)
            for row in missing:
                second = self.images[items[row][2]] if items[row][2] is not None else None
                cache[row] = (self.images[items[row][1]], second)
            if self.complete():
                self._write_cache()
        return [cache[r] for r in rows]

    def _kept_latents(self, paths: Sequence[str]):
        """The sampler latents kept for these images in this encoder's latent space (path -> latent)."""
        kept = {}
        for path in paths if self.latent_space else ():
            latent = read_sampled_latent(self.pairs.root, path, self.latent_space)
            if latent is not None:
                kept[path] = latent
        self._check_shapes(kept, [next(iter(self.images.values()))] if self.images else [])
        self.images.update(kept)
        self.kept_images += len(kept)
        return kept

    def _check_shapes(self, kept, others) -> None:
        shapes = {tuple(t.shape) for t in [*kept.values(), *others]}
        if len(shapes) > 1:
            raise DatasetError(
                f"the latents kept beside the images in {self.pairs.root / 'latents'} have other shapes than "
                f"this VAE's ({sorted(shapes)}), although they name its latent space; delete that folder and the "
                "images are encoded instead")

    def embeddings(self, kind: str, rows: Sequence[int]) -> PromptEmbeddings:
        self.rows(kind, rows)
        return PromptEmbeddings.cat([self.prompts[self.items[kind][r][0]] for r in rows])

    def complete(self) -> bool:
        return all(len(self.latents[k]) == len(self.items[k]) for k in self.items)

    def materialize(self) -> EncodedPreferenceData:
        """Everything encoded, as ordinary tensors."""
        for kind in self.items:
            for start in range(0, len(self.items[kind]), 16):  # bounded VAE batches
                self.rows(kind, range(start, min(start + 16, len(self.items[kind]))))
        pairs = self.latents["pairs"]
        rows = range(len(self.items["pairs"]))
        data = EncodedPreferenceData(torch.stack([pairs[r][0] for r in rows]), torch.stack([pairs[r][1] for r in rows]),
                                     self.embeddings("pairs", list(rows)))
        if self.items["replay"]:
            replay_rows = list(range(len(self.items["replay"])))
            data.replay_latents = torch.stack([self.latents["replay"][r][0] for r in replay_rows])
            data.replay_embeddings = self.embeddings("replay", replay_rows)
        return data

    def _write_cache(self) -> None:
        if self.cache_file is not None and not self.cache_file.is_file():
            _write_cache(self.cache_file, self.materialize())


def _row_list(index) -> List[int]:
    if torch.is_tensor(index):
        return [int(i) for i in index.reshape(-1).tolist()]
    if isinstance(index, slice):
        raise TypeError("lazy encoded data is indexed with a list or tensor of rows")
    if isinstance(index, int):
        return [index]
    return [int(i) for i in index]


class _LazyLatents:
    """Looks like a [N, C, H, W] latent tensor to the training loop: ``x[rows]``, ``len(x)``, ``x.shape``."""

    def __init__(self, encoder: _LazyEncoder, kind: str, position: int):
        self.encoder, self.kind, self.position = encoder, kind, position

    def __len__(self) -> int:
        return len(self.encoder.items[self.kind])

    @property
    def shape(self) -> torch.Size:
        first = self.encoder.rows(self.kind, [0])[0][self.position]
        return torch.Size((len(self), *first.shape))

    def __getitem__(self, index) -> torch.Tensor:
        rows = _row_list(index)
        tensors = [pair[self.position] for pair in self.encoder.rows(self.kind, rows)]
        return tensors[0] if isinstance(index, int) else torch.stack(tensors)


class _LazyEmbeddings:
    """Looks like ``PromptEmbeddings`` to the training loop: ``.index(rows)``."""

    def __init__(self, encoder: _LazyEncoder, kind: str):
        self.encoder, self.kind = encoder, kind

    def __len__(self) -> int:
        return len(self.encoder.items[self.kind])

    def index(self, rows) -> PromptEmbeddings:
        return self.encoder.embeddings(self.kind, _row_list(rows))


class LazyEncodedPreferenceData(EncodedPreferenceData):
    """``EncodedPreferenceData`` whose items are encoded the first time a batch uses them.

    A run of k steps encodes only the pairs its k batches draw (at most what the official loop encodes
    in those steps, and each pair only once); the cache file is written when every item is encoded.
    Missing files and mixed image sizes are reported at construction, before any training.
    """

    def __init__(self, bundle, pairs: PreferencePairs, cache_file: Optional[Path] = None):
        if len(pairs) == 0:
            raise DatasetError(f"the dataset in {pairs.root} has no pairs (or the selection is empty)")
        check_images(pairs, [p.preferred_image for p in pairs.pairs] + [p.rejected_image for p in pairs.pairs])
        if pairs.replay:
            check_images(pairs, [r.image for r in pairs.replay])
        self.encoder = _LazyEncoder(bundle, pairs, cache_file)
        self.winner_latents = _LazyLatents(self.encoder, "pairs", 0)
        self.loser_latents = _LazyLatents(self.encoder, "pairs", 1)
        self.embeddings = _LazyEmbeddings(self.encoder, "pairs")
        self.replay_latents = _LazyLatents(self.encoder, "replay", 0) if pairs.replay else None
        self.replay_embeddings = _LazyEmbeddings(self.encoder, "replay") if pairs.replay else None

    def __len__(self) -> int:
        return len(self.encoder.items["pairs"])

    def materialize(self) -> EncodedPreferenceData:
        return self.encoder.materialize()
