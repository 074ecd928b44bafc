"""Prompts for the least-squares merge's statistics, and recording them on a diffusers model by sampling.

The least-squares merge (``least_squares_merge``) needs, per layer, the inputs the model sees while it draws
each expert's own concept (with that expert applied) and while the base model draws prompts that must not
change. This module turns a user's concept list (``concepts`` formats: unsafe prompt, safe rewrite,
categories) or ``Category: prompt`` lines into those prompt sets, gives each expert the prompts of its own
categories, and records the statistics on a ``models.DiffusionBundle`` by actually sampling (the real
sampler's inputs, every step, with classifier-free guidance). The ComfyUI node uses the same prompt handling
with ComfyUI's own sampler (``nodes.collect_comfy_least_squares_statistics``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from .errors import DatasetError, MergeError
from .expert import SafetyExpert
from .least_squares_merge import LayerInputStatistics, record_statistics
from .pairs import _category_key, normalise_category

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_IMAGES_PER_PROMPT = 2


@dataclasses.dataclass
class MergePrompts:
    """Unsafe prompts per category (what each expert's concept looks like) and prompts that must not change."""

    concept: Dict[str, List[str]]
    safe: List[str]

    def summary(self) -> str:
        counts = ", ".join(f"{c} {len(p)}" for c, p in self.concept.items())
        return f"concept prompts: {counts or 'none'}; safe prompts: {len(self.safe)}"


def canonical_category(name: str) -> str:
    """The pack's spelling of a CoProV2 category (aliases accepted), or the user's own name as given."""
    try:
        return normalise_category(name)
    except DatasetError:
        return str(name).strip()


def _unique(items: Iterable[str]) -> List[str]:
    seen, out = set(), []
    for item in items:
        item = str(item).strip()
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def parse_category_lines(text: str, source: str = "concept prompts") -> Dict[str, List[str]]:
    """``Category: prompt`` lines (``#`` comments and blank lines skipped) → prompts per category."""
    by_category: Dict[str, List[str]] = {}
    for number, line in enumerate(str(text or "").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        category, colon, prompt = stripped.partition(":")
        if not colon or not category.strip() or not prompt.strip():
            raise DatasetError(f"{source}, line {number}: expected 'Category: prompt' (e.g. 'Violence: a bloody "
                               f"street fight'), got {stripped[:80]!r}")
        by_category.setdefault(canonical_category(category), []).append(prompt.strip())
    return {c: _unique(p) for c, p in by_category.items()}


def prompts_from_pairs(pairs: Sequence, extra_safe: Sequence[str] = ()) -> MergePrompts:
    """Unsafe prompts per category from prompt pairs (``concepts.PromptPair``); safe = their rewrites +
    ``extra_safe``."""
    concept: Dict[str, List[str]] = {}
    for pair in pairs:
        for category in pair.categories:
            concept.setdefault(canonical_category(category), []).append(pair.prompt)
    safe = _unique([p.safe_prompt for p in pairs] + list(extra_safe))
    return MergePrompts({c: _unique(p) for c, p in concept.items()}, safe)


def merge_prompts(pairs: Sequence = (), category_text: str = "", extra_safe: Sequence[str] = (),
                  source: str = "concept prompts") -> MergePrompts:
    """Concept and safe prompts from prompt pairs and/or ``Category: prompt`` lines plus extra safe prompts."""
    prompts = prompts_from_pairs(pairs, extra_safe)
    for category, lines in parse_category_lines(category_text, source).items():
        prompts.concept[category] = _unique(prompts.concept.get(category, []) + lines)
    if not prompts.concept:
        raise MergeError("the least-squares statistics need concept prompts: give a concept list (unsafe prompt, "
                         "safe prompt, category) or 'Category: prompt' lines for every expert's categories")
    if not prompts.safe:
        raise MergeError("the least-squares statistics need safe prompts (prompts whose images must not change): "
                         "give a concept list with safe rewrites or a safe-prompt file / text")
    return prompts


def prompts_per_expert(experts: Sequence[SafetyExpert], concept: Mapping[str, Sequence[str]]) -> Dict[str, List[str]]:
    """Each expert's own concept prompts: those of the categories it was trained for (matched forgivingly).

    An expert with no categories, or whose categories have no prompts, is a ``MergeError`` that names it.
    """
    by_key: Dict[str, List[str]] = {}
    for category, prompts in concept.items():
        by_key.setdefault(_category_key(canonical_category(category)), []).extend(prompts)
    available = sorted(concept)
    result: Dict[str, List[str]] = {}
    for expert in experts:
        if not expert.categories:
            raise MergeError(f"expert {expert.name!r} records no categories, so its concept prompts cannot be "
                             f"chosen; re-save it with its categories (the prompts cover {available})")
        chosen = _unique(p for c in expert.categories for p in by_key.get(_category_key(canonical_category(c)), []))
        if not chosen:
            raise MergeError(f"expert {expert.name!r} (categories {list(expert.categories)}) has no concept prompts: "
                             f"the prompts cover {available or 'no category'}; add prompts of "
                             f"{list(expert.categories)}")
        result[expert.name] = chosen
    return result


def record_bundle_statistics(
    bundle,
    experts: Sequence[SafetyExpert],
    expert_prompts: Mapping[str, Sequence[str]],
    safe_prompts: Sequence[str],
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
    seed: int = 0,
    batch_size: int = 4,
    negative_prompt: str = "",
    progress: Optional[Callable[[str], None]] = None,
) -> LayerInputStatistics:
    """``LayerInputStatistics`` for a diffusers bundle: sample each expert's prompts with it applied, safe
    prompts without.

    Every prompt is drawn ``images_per_prompt`` times with seeds ``seed, seed+1, …`` (the same seeds for every
    prompt set), with ``bundle.sample`` (DDIM, ``steps``, ``guidance_scale``): the hooks see the inputs of
    every denoising step, as when the merged model is used.
    """
    from .calibration import diffusers_module_lookup

    if int(steps) < 1 or int(images_per_prompt) < 1 or int(batch_size) < 1:
        raise MergeError(f"steps, images per prompt and batch size must be ≥ 1 (got {steps}, {images_per_prompt}, "
                         f"{batch_size})")
    safe_prompts = _unique(safe_prompts)
    if not safe_prompts:
        raise MergeError("the least-squares statistics need safe prompts (prompts whose images must not change)")
    missing = [e.name for e in experts if not expert_prompts.get(e.name)]
    if missing:
        raise MergeError(f"no concept prompts for expert(s) {missing}")
    encoders = {name: encoder for name, encoder in zip(("text_encoder", "text_encoder_2"), bundle.text_encoders)}
    lookup = diffusers_module_lookup(bundle.unet, encoders)
    seeds = [int(seed) + i for i in range(int(images_per_prompt))]
    latent_size = int(bundle.unet.config.sample_size)  # the UNet's native size (a VAE-less bundle has no factor)
    bundle = dataclasses.replace(bundle, vae=None)  # same UNet and encoders; no pointless decoding of the images

    def draw(prompts: Sequence[str]) -> None:
        items = [(p, s) for p in prompts for s in seeds]
        for start in range(0, len(items), int(batch_size)):
            chunk = items[start:start + int(batch_size)]
            bundle.sample([p for p, _ in chunk], [s for _, s in chunk], steps=int(steps),
                          guidance_scale=float(guidance_scale), negative_prompt=negative_prompt,
                          latent_size=latent_size)

    def run_concept(expert: SafetyExpert) -> None:
        if progress:
            progress(f"expert {expert.name}: {len(expert_prompts[expert.name])} prompts")
        draw(expert_prompts[expert.name])

    def run_safe() -> None:
        if progress:
            progress(f"base model: {len(safe_prompts)} safe prompts")
        draw(safe_prompts)

    info = {"source": "diffusers", "model": getattr(bundle, "name", "model"), "steps": int(steps),
            "guidance_scale": float(guidance_scale), "images_per_prompt": int(images_per_prompt), "seed": int(seed),
            "concept_prompts": {k: len(v) for k, v in expert_prompts.items()}, "safe_prompts": len(safe_prompts)}
    return record_statistics(experts, lookup, run_concept, run_safe, info)
