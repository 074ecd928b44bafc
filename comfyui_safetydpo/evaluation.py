"""Evaluation: render a prompt list with the base and aligned models, classify, and measure.

A run lives in one output folder::

    run.json                     the configuration and its hash (prompts, seeds, variants, settings)
    images/<variant>/<prompt>_s<seed>.png
    generations.jsonl            one line per rendered image (variant, prompt index, seed, file)
    classified_<classifier>.jsonl  one line per classified image (unsafe, score, labels or error)

Rendering and classifying are resumable: finished images are skipped, a half-written last line is
ignored, and a folder made with another configuration is refused (``RunMismatchError``) so no report
silently mixes runs. ``render`` is any callable ``render(prompts, seeds) -> images [B, 3, H, W] in
[-1, 1]``: a ``DiffusionBundle``, ComfyUI's sampler or the demo world all fit.

Metrics: per-category unsafe rate with Wilson intervals (base vs every aligned variant), fidelity to the
base model on safe prompts (same prompt and seed: mean absolute pixel difference and SSIM, no weights
needed), FID through torchmetrics with Inception weights from a local file, CLIPScore with a local CLIP.

The jobs live in their own modules, all re-exported here (``from comfyui_safetydpo.evaluation import ...``
keeps working): ``evaluation_prompts`` (prompt lists), ``evaluation_run`` (the resumable run and its
files), ``evaluation_statistics`` (rates, fidelity, the summary), ``image_similarity`` (SSIM) and
``quality_metrics`` (FID, CLIPScore with local weights).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch

from .evaluation_prompts import (SAFE_CATEGORY, EvalPrompt, coprov2_prompts, load_prompt_file, normalise_prompts,
                                 parse_prompt_lines)
from .evaluation_run import (BASE_VARIANT, RUN_FORMAT, EvaluationRun, Render, RunMismatchError, Variant, config_hash,
                             from_uint8, load_png, read_jsonl, repair_jsonl, save_png, to_uint8, write_text_atomic)
from .evaluation_statistics import (ALL_CATEGORIES, DEFAULT_CHANGE_THRESHOLD, EvaluationSummary, fidelity_pairs,
                                    fidelity_summary, summarize, unsafe_rates, wilson_interval)
from .image_similarity import image_distance, ssim
from .quality_metrics import (CLIP_ENV, CLIP_HELP, INCEPTION_ENV, INCEPTION_FILE, INCEPTION_HELP, clip_score, fid_score,
                              load_clip, load_inception, resolve_local_file)

__all__ = [
    "SAFE_CATEGORY", "EvalPrompt", "coprov2_prompts", "load_prompt_file", "normalise_prompts", "parse_prompt_lines",
    "ALL_CATEGORIES", "BASE_VARIANT", "RUN_FORMAT", "EvaluationRun", "Render", "RunMismatchError", "Variant",
    "config_hash", "from_uint8", "load_png", "read_jsonl", "repair_jsonl", "save_png", "to_uint8",
    "write_text_atomic", "DEFAULT_CHANGE_THRESHOLD", "EvaluationSummary", "fidelity_pairs", "fidelity_summary",
    "summarize", "unsafe_rates", "wilson_interval", "image_distance", "ssim", "CLIP_ENV", "CLIP_HELP",
    "INCEPTION_ENV", "INCEPTION_FILE", "INCEPTION_HELP", "clip_score", "fid_score", "load_clip", "load_inception",
    "resolve_local_file", "evaluate", "bundle_renderer",
]


def evaluate(output_dir, prompts: Iterable, seeds: Sequence[int], renderers: Mapping[str, Render], classifier,
             variants: Optional[Sequence] = None, settings: Optional[Mapping] = None, batch_size: int = 4,
             progress=None, check_cancel=None) -> EvaluationSummary:
    """Render (resumably), classify and summarise in one call; variants default to the renderers' keys."""
    variants = variants if variants is not None else list(renderers)
    run = EvaluationRun(output_dir, prompts, seeds, variants, settings).open()
    run.generate(renderers, batch_size=batch_size, progress=progress, check_cancel=check_cancel)
    run.classify(classifier, batch_size=max(batch_size, 8), check_cancel=check_cancel)
    return summarize(run, getattr(classifier, "name", type(classifier).__name__))


def bundle_renderer(bundle, steps: int = 20, guidance_scale: float = 5.0, **kwargs) -> Render:
    """``render(prompts, seeds)`` for a ``DiffusionBundle`` (its ``sample`` with fixed settings)."""

    def render(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return bundle.sample(list(prompts), list(seeds), steps=steps, guidance_scale=guidance_scale, **kwargs)

    return render
