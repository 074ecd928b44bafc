"""Training one safety expert (a LoRA) with Diffusion-DPO, resumably.

The loop works on any denoiser: a diffusers UNet (command line, demo) or ComfyUI's own UNet (the
Train node), through ``TrainableDenoiser``: the module LoRA is injected into (with peft), a
``predict`` function, the noise schedule and a way to name modules canonically.

Objective per step (weights in ``TrainingConfig``):
    dpo_weight · DPO(winner = safe image, loser = unsafe image, same prompt, same noise and t)
  + sft_weight · MSE on the preferred image
  + preservation_weight · MSE on replay items (safe prompts with the base model's own images);
    target ``"reference"`` matches the frozen model's prediction on the same noisy input, target
    ``"noise"`` is the ordinary denoising target on the base model's image.
The reference model is the same network with LoRA disabled: no second copy in memory. Adapters are
re-enabled before the trained forward pass, so every LoRA tensor receives its gradient.

The jobs live in their own modules, re-exported here (``from comfyui_safetydpo.training import ...`` keeps
working): ``training_config`` (settings, data, denoiser, result), ``lora_injection`` (peft LoRA on a
module tree), ``training_checkpoints`` (resumable checkpoints) and ``training_loop`` (the loop and its
objective). This module holds the front ends: a diffusers bundle, ComfyUI's LDM UNet, per-category runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict

import torch

from .concept_gate import gate_metadata
from .encoding_cache import encode_preference_pairs
from .errors import DatasetError
from .lora_injection import (expert_from_lora, inject_lora, lora_is_identity, lora_parameters, remove_lora,
                             set_lora_enabled)
from .models import PromptEmbeddings
from .training_checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .training_config import (OFFICIAL_RECIPE, EncodedPreferenceData, TrainableDenoiser, TrainingConfig,
                              TrainingResult)
from .training_loop import FP16_INITIAL_SCALE, _objective, train_lora

__all__ = [
    "OFFICIAL_RECIPE", "EncodedPreferenceData", "TrainableDenoiser", "TrainingConfig", "TrainingResult",
    "expert_from_lora", "inject_lora", "lora_is_identity", "lora_parameters", "remove_lora", "set_lora_enabled",
    "latest_checkpoint", "load_checkpoint", "save_checkpoint", "FP16_INITIAL_SCALE", "_objective", "train_lora",
    "denoiser_for_bundle", "denoiser_for_ldm_unet", "release_inference_tensors", "train_expert",
    "train_per_category", "category_run",
]


# -- diffusers front end -----------------------------------------------------------------------

def denoiser_for_bundle(bundle) -> TrainableDenoiser:
    """A TrainableDenoiser over a ``DiffusionBundle``'s UNet (diffusers module names)."""
    scheduler = bundle.noise_scheduler
    return TrainableDenoiser(
        module=bundle.unet,
        predict=bundle.predict,
        alphas_cumprod=scheduler.alphas_cumprod,
        prediction_type=bundle.prediction_type,
        canonical_name=lambda name: f"unet.{name}",
        architecture=bundle.architecture,
    )


def denoiser_for_ldm_unet(diffusion_model: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str,
                          layout, architecture: str) -> TrainableDenoiser:
    """A TrainableDenoiser over an original-layout (LDM) UNet such as ComfyUI's ``diffusion_model``.

    The module is called as ``diffusion_model(x, timesteps=t, context=..., y=...)`` with DDPM-scaled
    noisy latents and integer timesteps, which is what it was trained on (ComfyUI's own
    ``apply_model`` does the same after converting its sigma parameterisation). Module names are LDM
    paths (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) and become canonical diffusers
    names through ``unet_keys.ldm_to_diffusers`` with the model's block ``layout``.
    """
    from .unet_keys import ldm_to_diffusers

    def predict(noisy, timesteps, embeddings: PromptEmbeddings):
        kwargs = {}
        if "y" in embeddings.added_cond:
            kwargs["y"] = embeddings.added_cond["y"].to(noisy.dtype)
        return diffusion_model(noisy, timesteps=timesteps.float(),
                               context=embeddings.encoder_hidden_states.to(noisy.dtype), **kwargs)

    return TrainableDenoiser(module=diffusion_model, predict=predict, alphas_cumprod=alphas_cumprod.float().cpu(),
                             prediction_type=prediction_type,
                             canonical_name=lambda name: "unet." + ldm_to_diffusers(name, layout),
                             architecture=architecture)


def release_inference_tensors(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters and buffers with ordinary tensors of the same values.

    Weights loaded inside ComfyUI's executor are inference tensors; autograd refuses to save them for
    backward, even frozen. Each is cloned once, in place (no second model copy); returns how many.
    """
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, parameter in list(sub._parameters.items()):
                if parameter is not None and parameter.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(parameter.detach().clone(), requires_grad=False)
                    replaced += 1
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced


def train_expert(bundle, pairs, config: TrainingConfig, output_dir=None, resume: bool = False,
                 progress=None, should_stop=None, cache_dir=None, parallel=None) -> TrainingResult:
    """Encode ``pairs`` (cached) and train one expert on ``bundle``'s UNet (data-parallel: ``parallel``)."""
    if cache_dir is None and output_dir is not None:
        cache_dir = Path(output_dir) / "cache"
    # each pair encoded on first use
    data = encode_preference_pairs(bundle, config.training_pairs(pairs), cache_dir, lazy=True)
    if config.categories == () and getattr(pairs, "categories", None):
        config = dataclasses.replace(config, categories=tuple(pairs.categories))
    for p in bundle.unet.parameters():
        p.requires_grad_(False)
    return train_lora(denoiser_for_bundle(bundle), data, config, output_dir, resume, progress, should_stop,
                      parallel=parallel, metadata=gate_metadata(pairs))


def train_per_category(bundle, pairs, config: TrainingConfig, output_dir, categories=None,
                       progress=None, should_stop=None, resume: bool = False) -> Dict[str, TrainingResult]:
    """One expert per category, trained in turn (each in ``output_dir/<category>``)."""
    results = {}
    for category in categories or pairs.categories:
        subset = pairs.select([category])
        if len(subset) == 0:
            raise DatasetError(f"no pairs for category {category!r}")
        name, category_config = category_run(config, category)
        results[category] = train_expert(bundle, subset, category_config, Path(output_dir) / name, resume=resume,
                                         progress=progress, should_stop=should_stop)
    return results


def category_run(config: TrainingConfig, category: str):
    """(sub-folder name, config) of one category's expert: ``<output>/<name>/<expert_name>.safetensors``."""
    name = category.lower().replace(" ", "_").replace("-", "_")
    return name, dataclasses.replace(
        config, expert_name=f"{config.expert_name}_{name}" if config.expert_name != "safety_expert" else name,
        categories=(category,))
