"""Render preference pairs with the model being aligned and write a resumable dataset folder.

For every prompt pair and every one of ``images_per_prompt`` seeds, the unsafe prompt and its safe
rewrite are rendered with the same seed (same starting noise), so the two images differ by the
concept and little else. Images go to ``<folder>/images/<pair_id>_rejected.png`` / ``_preferred.png``
and ``manifest.json`` is rewritten atomically after every finished prompt pair, so a build that is
stopped (``should_stop``, Cancel, a crash) resumes where it stopped: pairs already in the manifest
whose images exist and are readable are not rendered again, and none is written twice.

``render(prompts, seeds)`` is any callable returning images in [-1, 1] ([B, 3, H, W] tensor or
array): ``functools.partial(bundle.sample, steps=..., guidance_scale=...)``, the ComfyUI sampler of
the Build Safety Pairs node, or the demo world. A renderer that returns ``RenderedImages`` with the
latents it decoded also gets those kept under ``latents/`` (bound to the image bytes and the latent
space), so training on the same VAE reads them instead of encoding the images again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .concepts import PromptPair
from .errors import DatasetError
from .pairs import (
    MANIFEST_NAME,
    PreferencePair,
    PreferencePairs,
    RenderedImages,
    ReplayItem,
    image_size,
    read_manifest,
    save_image_tensor,
    save_sampled_latent,
)

LOG = logging.getLogger(__name__)

Render = Callable[[Sequence[str], Sequence[int]], object]


def _as_images(images, expected: int):
    """A list of [3, H, W] float tensors in [-1, 1] from whatever ``render`` returned."""
    import numpy as np
    import torch

    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(np.asarray(i)) if not torch.is_tensor(i) else i for i in images])
    elif not torch.is_tensor(images):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != expected:
        raise DatasetError(
            f"the renderer returned images of shape {tuple(images.shape)}; expected [{expected}, 3, H, W] in [-1, 1]"
        )
    if not torch.isfinite(images).all():
        raise DatasetError("the renderer returned NaN/inf pixels; check the model and sampler settings")
    return [image.detach().float().cpu() for image in images]


def _rendered(result, expected: int):
    """Images, the latents they came from (or None) and the latent space, from what ``render`` returned."""
    if not isinstance(result, RenderedImages):
        return _as_images(result, expected), None, ""
    images = _as_images(result.images, expected)
    if result.latents is None or not result.latent_space:
        return images, None, ""
    if len(result.latents) != expected:
        raise DatasetError(f"the renderer returned {len(result.latents)} latents for {expected} images")
    return images, [latent.detach().float().cpu() for latent in result.latents], result.latent_space


def pair_key(prompt_pair: PromptPair) -> str:
    """Stable id of a prompt pair: its source id (CoProV2 ``NNNNNNN_K``) or a hash of its two prompts.

    Ids (and seeds) do not depend on the position in the list, so adding, removing or reordering
    lines of a concept file and building again renders only what is new.
    """
    if prompt_pair.source_id:
        return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in prompt_pair.source_id)
    digest = hashlib.sha1(f"{prompt_pair.prompt}\n{prompt_pair.safe_prompt}".encode("utf-8")).hexdigest()
    return digest[:12]


def pair_seed(base_seed: int, key: str, k: int, images_per_prompt: int) -> int:
    """Seed of image ``k`` of a prompt pair: ``base_seed`` + a per-pair offset from its id + ``k``."""
    offset = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:7], 16) * images_per_prompt
    return (int(base_seed) + offset + k) % (2**31 - 1)


def _valid(root: Path, relative: str, size=None) -> bool:
    path = root / relative
    if not path.is_file():
        return False
    try:
        found = image_size(path)
    except DatasetError:
        return False
    return size is None or tuple(found) == tuple(size)


def build_pairs(
    render: Render,
    prompt_pairs: Sequence[PromptPair],
    output_folder,
    images_per_prompt: int = 1,
    base_seed: int = 0,
    model_info: Optional[Dict[str, object]] = None,
    sampler_settings: Optional[Dict[str, object]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    replay_prompts: Sequence[str] = (),
    extra_categories: Sequence[str] = (),
) -> PreferencePairs:
    """Render every prompt pair ``images_per_prompt`` times into ``output_folder``; returns the dataset.

    Pair ids and seeds come from the prompts (``pair_key``, ``pair_seed``), not their positions; the
    unsafe and the safe prompt of a pair share the seed. Pairs built earlier in the same folder from
    other prompts (same model and settings) are kept and counted in ``info["kept_from_earlier_builds"]``.
    ``replay_prompts`` (safe prompts) are rendered too, as the base model's own images for the
    preservation term. ``progress(done, total)`` is called after each unit
    of work; when ``should_stop()`` returns True the build stops after the current prompt pair and the
    returned dataset has ``info["complete"] == False``. Running the same call again resumes.
    A folder built with another model, sampler settings, seed or image count is refused, as is an id
    whose prompts changed (``DatasetError``).
    """
    if images_per_prompt < 1:
        raise ValueError("images_per_prompt must be at least 1")
    prompt_pairs = list(prompt_pairs)
    if not prompt_pairs and not replay_prompts:
        raise DatasetError("no prompt pairs to render (empty selection)")
    root = Path(output_folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    info = {
        "model": dict(model_info or {}),
        "sampler": dict(sampler_settings or {}),
        "images_per_prompt": int(images_per_prompt),
        "base_seed": int(base_seed),
        "created_by": "safetydpo.pair_builder",
        "extra_categories": list(extra_categories),
    }
    done_pairs: Dict[str, PreferencePair] = {}
    done_replay: Dict[str, ReplayItem] = {}
    size = None
    if (root / MANIFEST_NAME).is_file():
        existing = read_manifest(root)
        old = existing.get("info") or {}
        for key in ("model", "sampler", "images_per_prompt", "base_seed"):
            if old.get(key) != info[key]:
                raise DatasetError(
                    f"{root} holds pairs built with {key} = {old.get(key)!r}, not {info[key]!r}; "
                    "choose a new output folder (or delete this one) to build with other settings"
                )
        size = old.get("image_size")
        if old.get("latent_space"):
            info["latent_space"] = old["latent_space"]
        for entry in existing.get("pairs") or []:
            entry = dict(entry)
            entry["categories"] = tuple(entry["categories"])
            done_pairs[entry["pair_id"]] = PreferencePair(**entry)
        for entry in existing.get("replay") or []:
            done_replay[entry["item_id"]] = ReplayItem(**entry)

    plan: List[tuple] = []
    seen_keys: Dict[str, int] = {}
    for prompt_pair in prompt_pairs:
        key = pair_key(prompt_pair)
        if key in seen_keys:  # the same pair twice in the list: render it once more with other seeds
            seen_keys[key] += 1
            key = f"{key}-{seen_keys[key]}"
        else:
            seen_keys[key] = 0
        entries = []
        for k in range(images_per_prompt):
            pair_id = f"{key}_{k}"
            entries.append(PreferencePair(
                pair_id=pair_id,
                prompt=prompt_pair.prompt,
                safe_prompt=prompt_pair.safe_prompt,
                categories=tuple(prompt_pair.categories),
                preferred_image=f"images/{pair_id}_preferred.png",
                rejected_image=f"images/{pair_id}_rejected.png",
                seed=pair_seed(base_seed, key, k, images_per_prompt),
                concept=prompt_pair.concept,
            ))
        plan.append(("pair", entries))
    for prompt in dict.fromkeys(replay_prompts):
        items = []
        for k in range(images_per_prompt):
            item_id = f"replay_{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:12]}_{k}"
            seed = pair_seed(base_seed, f"replay:{prompt}", k, images_per_prompt)
            items.append(ReplayItem(item_id, prompt, f"images/{item_id}.png", seed))
        plan.append(("replay", items))

    for kind, entries in plan:  # refuse a folder whose entries of the same id say something else
        for entry in entries:
            old = (done_pairs if kind == "pair" else done_replay).get(
                entry.pair_id if kind == "pair" else entry.item_id)
            if old is not None and old != entry:
                raise DatasetError(
                    f"{root}: entry {getattr(entry, 'pair_id', getattr(entry, 'item_id', ''))!r} was built from "
                    f"other prompts ({old.prompt!r}); use a new output folder for a changed list"
                )

    def finished(kind, entries) -> bool:
        for entry in entries:
            if kind == "pair":
                if entry.pair_id not in done_pairs:
                    return False
                if not (_valid(root, entry.preferred_image, size) and _valid(root, entry.rejected_image, size)):
                    return False
            else:
                if entry.item_id not in done_replay or not _valid(root, entry.image, size):
                    return False
        return True

    planned_ids = {e.pair_id for kind, es in plan if kind == "pair" for e in es}
    planned_replay = {e.item_id for kind, es in plan if kind == "replay" for e in es}
    earlier_pairs = [p for i, p in done_pairs.items() if i not in planned_ids]
    earlier_replay = [r for i, r in done_replay.items() if i not in planned_replay]
    if earlier_pairs or earlier_replay:
        LOG.warning("%s: keeping %d pair(s) and %d replay item(s) built earlier from other prompts", root,
                    len(earlier_pairs), len(earlier_replay))

    def manifest(complete: bool) -> PreferencePairs:
        order_pairs = [e for kind, es in plan if kind == "pair" for e in es if e.pair_id in done_pairs]
        order_replay = [e for kind, es in plan if kind == "replay" for e in es if e.item_id in done_replay]
        meta = {**info, "image_size": size, "complete": complete,
                "planned_pairs": len(planned_ids), "kept_from_earlier_builds": len(earlier_pairs)}
        dataset = PreferencePairs(root=root, pairs=order_pairs + earlier_pairs, replay=order_replay + earlier_replay,
                                  info=meta)
        dataset.save(root)
        return dataset

    total = len(plan)
    done = 0
    rendered_units = 0
    stopped = False
    for kind, entries in plan:
        if finished(kind, entries):
            done += 1
            continue
        if should_stop is not None and should_stop():
            stopped = True
            break
        if kind == "pair":
            seeds = [e.seed for e in entries]
            prompts = [entries[0].prompt] * len(entries) + [entries[0].safe_prompt] * len(entries)
            images, latents, space = _rendered(render(prompts, seeds + seeds), 2 * len(entries))
            paths = [e.rejected_image for e in entries] + [e.preferred_image for e in entries]
            for image in images:
                size = size or [int(image.shape[2]), int(image.shape[1])]
                if [int(image.shape[2]), int(image.shape[1])] != list(size):
                    raise DatasetError(f"the renderer changed image size to {tuple(image.shape[1:])} from {size} "
                                       "(w, h)")
        else:
            images, latents, space = _rendered(render([e.prompt for e in entries], [e.seed for e in entries]),
                                               len(entries))
            paths = [e.image for e in entries]
            size = size or [int(images[0].shape[2]), int(images[0].shape[1])]
        for index, (path, image) in enumerate(zip(paths, images)):
            save_image_tensor(image, root / path)
            if latents is not None:
                save_sampled_latent(root, path, latents[index], space)
                info["latent_space"] = space
        for entry in entries:
            (done_pairs if kind == "pair" else done_replay)[entry.pair_id if kind == "pair" else entry.item_id] = entry
        rendered_units += 1
        manifest(complete=False)
        done += 1
        if progress is not None:
            progress(done, total)
    dataset = manifest(complete=not stopped)
    dataset.info["rendered_now"] = rendered_units
    LOG.info("pair build in %s: %d of %d prompt units done (%d rendered now)%s", root, done, total,
             rendered_units, " - stopped, run again to resume" if stopped else "")
    return dataset
