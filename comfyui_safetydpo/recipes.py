"""Named training presets: the SafetyDPO paper's objective and the measured default that keeps safe prompts.

- ``safetydpo``: the paper's objective as its official code runs it: Diffusion-DPO only, LoRA rank 4 (alpha 4)
  on the UNet attention projections to_q/to_k/to_v/to_out.0, β 5000, learning rate 1e-5
  (``training.OFFICIAL_RECIPE``).
- ``preserving`` (default): DPO β 500 plus a supervised term (weight 1) on the preferred image and a
  preservation term (weight 5) that keeps the model's predictions on replay items (safe prompts with the
  base model's own images) equal to the frozen model's; same LoRA; learning rate 1e-4 for real models (the
  built-in demo uses 3e-3 on its tiny model); each pair also trained under its prompts with the first words
  left out (``prompt_crops``). On the demo world plain DPO changed most safe-prompt images while removing the
  concept; the supervised and preservation terms are what kept them, and the prompt crops made the experts
  remove their concept in wordings they never saw (docs/demo.md).
  It needs replay items in the pairs dataset: ``require_replay`` says how to build them.

A preset fills the training settings; a config file and explicit flags/widgets override it field by field.
``TrainingConfig``'s own defaults are left as they are (the library's plain constructor is unchanged).
"""

from __future__ import annotations

from typing import Dict, Mapping

from .errors import DatasetError, TrainingError

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

RECIPES: Dict[str, Dict[str, object]] = {
    "safetydpo": {"rank": 4, "alpha": 4.0, "target_modules": ATTENTION, "learning_rate": 1e-5, "dpo_beta": 5000.0,
                  "dpo_weight": 1.0, "sft_weight": 0.0, "preservation_weight": 0.0},
    "preserving": {"rank": 4, "alpha": 4.0, "target_modules": ATTENTION, "learning_rate": 1e-4, "dpo_beta": 500.0,
                   "dpo_weight": 1.0, "sft_weight": 1.0, "preservation_weight": 5.0,
                   "preservation_target": "reference", "prompt_crops": True},
}
DEFAULT_RECIPE = "preserving"
CUSTOM = "custom"
"""Node choice meaning "no preset: the widgets as set" (the command line's equivalent is giving every flag)."""

DESCRIPTIONS = {
    "safetydpo": "the SafetyDPO paper's objective: DPO only, β 5000, lr 1e-5, LoRA rank 4 on to_q/to_k/to_v/to_out.0",
    "preserving": "measured default: DPO β 500 + supervised weight 1 on the preferred image + preservation weight 5 "
                  "toward the frozen model on replay items (safe prompts), prompt crops, lr 1e-4, LoRA rank 4 on "
                  "to_q/to_k/to_v/to_out.0; needs replay items",
}


def recipe_settings(name: str) -> Dict[str, object]:
    """A copy of the preset's training settings (``TrainingConfig`` field names)."""
    if name not in RECIPES:
        raise TrainingError(f"unknown training recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def with_recipe(name: str, overrides: Mapping[str, object]) -> Dict[str, object]:
    """The preset's settings with ``overrides`` (config file, flags, widgets) on top, field by field."""
    return {**recipe_settings(name), **{k: v for k, v in overrides.items() if v is not None}}


def require_replay(config, pairs, recipe: str = "", where: str = "the pairs dataset") -> None:
    """A ``DatasetError`` saying how to build replay items when the preservation term has none to work on."""
    if float(getattr(config, "preservation_weight", 0.0)) <= 0 or len(getattr(pairs, "replay", []) or []) > 0:
        return
    by = f"recipe {recipe!r} trains" if recipe else "training"
    raise DatasetError(
        f"{where} has no replay items, but {by} with preservation weight {config.preservation_weight:g}: it keeps the "
        "model's predictions on safe prompts equal to the frozen model's, using the base model's own images of safe "
        "prompts. Build them into the same dataset folder: `python trainer/build_pairs.py --model MODEL --concepts "
        "YOUR_CONCEPTS --replay safe_prompts.txt --output PAIRS_FOLDER` (safe_prompts.txt: one prompt that must not "
        "change per line; pairs already rendered are kept), or in ComfyUI with Build Safety Pairs' replay_prompts "
        "(same dataset_name and settings). Or train without it: recipe 'safetydpo', or preservation weight 0.")
