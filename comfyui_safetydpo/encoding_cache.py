"""Encode preference pairs once (VAE latents, text embeddings) and cache them on disk.

The DPO loop then never runs the VAE or the text encoders: every step reads cached tensors. The cache
is a safetensors file keyed by a hash of the model identity, the prompts and the image files' bytes; a
corrupt or stale entry is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .errors import DatasetError, LoraFormatError
from .models import PromptEmbeddings
from .pairs import PreferencePairs, load_image_tensor
from .training import EncodedPreferenceData

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


def _cache_key(bundle, pairs: PreferencePairs, identity: Optional[str] = None) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    digest.update((identity or _model_identity(bundle)).encode())
    for pair in pairs.pairs:
        digest.update(json.dumps([pair.pair_id, pair.prompt, pair.preferred_image, pair.rejected_image]).encode())
        for rel in (pair.preferred_image, pair.rejected_image):
            path = pairs.image_path(rel)
            if path.is_file():
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    for item in pairs.replay:
        digest.update(json.dumps([item.item_id, item.prompt, item.image]).encode())
        path = pairs.image_path(item.image)
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


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


def _encode_in_chunks(function, items, chunk: int = 16):
    outputs = [function(items[i:i + chunk]) for i in range(0, len(items), chunk)]
    return outputs


def _embeddings_for(bundle, prompts: List[str]) -> PromptEmbeddings:
    unique = sorted(set(prompts))
    encoded = PromptEmbeddings.cat(_encode_in_chunks(bundle.encode_prompts, unique))
    position = {p: i for i, p in enumerate(unique)}
    return encoded.index(torch.tensor([position[p] for p in prompts]))


def encode_preference_pairs(bundle, pairs: PreferencePairs, cache_dir: Optional[Path] = None,
                            identity: Optional[str] = None) -> EncodedPreferenceData:
    """Latents and embeddings for every pair (and replay item), from the cache when it is valid.

    ``bundle`` is anything with ``encode_prompts(list) -> PromptEmbeddings`` and ``encode_images(
    [B, 3, H, W] in [-1, 1]) -> latents`` (a ``DiffusionBundle``, or the ComfyUI node's encoder, which
    passes its own model ``identity`` for the cache key).
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
    winners = load_images(pairs, [p.preferred_image for p in pairs.pairs])
    losers = load_images(pairs, [p.rejected_image for p in pairs.pairs])
    if winners.shape[1:] != losers.shape[1:]:
        raise DatasetError(f"preferred and rejected images differ in size in {pairs.root}")
    encode = lambda images: bundle.encode_images(images).float().cpu()  # noqa: E731
    data = EncodedPreferenceData(
        winner_latents=torch.cat(_encode_in_chunks(encode, winners)),
        loser_latents=torch.cat(_encode_in_chunks(encode, losers)),
        embeddings=_embeddings_for(bundle, [p.prompt for p in pairs.pairs]).to("cpu", torch.float32),
    )
    if pairs.replay:
        replay_images = load_images(pairs, [r.image for r in pairs.replay])
        data.replay_latents = torch.cat(_encode_in_chunks(encode, replay_images))
        data.replay_embeddings = _embeddings_for(bundle, [r.prompt for r in pairs.replay]).to("cpu", torch.float32)
    if cache_file is not None:
        _write_cache(cache_file, data)
    return data


def _write_cache(path: Path, data: EncodedPreferenceData) -> None:
    from safetensors.torch import save_file

    tensors = {"winner_latents": data.winner_latents, "loser_latents": data.loser_latents,
               "embeddings.hidden": data.embeddings.encoder_hidden_states}
    tensors.update({f"embeddings.added.{k}": v for k, v in data.embeddings.added_cond.items()})
    if data.replay_latents is not None:
        tensors["replay_latents"] = data.replay_latents
        tensors["replay_embeddings.hidden"] = data.replay_embeddings.encoder_hidden_states
        tensors.update({f"replay_embeddings.added.{k}": v for k, v in data.replay_embeddings.added_cond.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temp, metadata={"version": CACHE_VERSION})
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def _read_cache(path: Path) -> EncodedPreferenceData:
    from .lora_files import read_safetensors

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
