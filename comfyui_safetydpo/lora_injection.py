"""LoRA (peft) on any module tree: inject, switch off for the reference model, remove, read out as an expert."""

from __future__ import annotations

import json
from typing import Dict, List, Optional

import torch

from .errors import TrainingError
from .expert import LoraModule, SafetyExpert
from .training_config import TrainableDenoiser, TrainingConfig


def inject_lora(module: torch.nn.Module, config: TrainingConfig) -> List[str]:
    """Put a peft LoRA (adapter "default") on the target modules; returns the wrapped module names."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(config.target_modules)
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets,
                             init_lora_weights="gaussian", lora_dropout=0.0)
    # Gaussian init of A, zeros for B: the expert starts as the identity (ΔW = 0).
    inject_adapter_in_model(lora_config, module)
    names = [n for n, m in module.named_modules() if _is_lora_layer(m)]
    if not names:
        raise TrainingError(f"no module matched the LoRA targets {targets}; check target_modules for this model")
    for name, parameter in module.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return names


def _is_lora_layer(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and "default" in getattr(module, "lora_A", {})


def set_lora_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off (off = the frozen reference model)."""
    for sub in module.modules():
        if _is_lora_layer(sub):
            sub.enable_adapters(enabled)


def remove_lora(module: torch.nn.Module) -> None:
    """Take the LoRA layers out again, leaving the original network as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer) and _is_lora_layer(sub):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    if "peft_config" in module.__dict__:
        del module.peft_config  # peft's bookkeeping on the model; a later injection starts clean


def lora_is_identity(module: torch.nn.Module) -> bool:
    """True while every LoRA up-projection (B) is exactly zero, as after injection: ΔW = 0 everywhere."""
    with torch.no_grad():
        return all(not bool(p.any()) for n, p in module.named_parameters() if "lora_B" in n)


def lora_parameters(module: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def expert_from_lora(module: torch.nn.Module, denoiser: TrainableDenoiser, config: TrainingConfig,
                     metadata: Optional[Dict[str, str]] = None) -> SafetyExpert:
    """The trained LoRA as a SafetyExpert with canonical names."""
    modules = {}
    for name, sub in module.named_modules():
        if _is_lora_layer(sub):
            down = sub.lora_A["default"].weight.detach().float().cpu().clone()
            up = sub.lora_B["default"].weight.detach().float().cpu().clone()
            modules[denoiser.canonical_name(name)] = LoraModule(down=down, up=up, alpha=float(config.alpha))
    recipe = {"method": "diffusion_dpo", **config.to_json()}
    return SafetyExpert(
        name=config.expert_name, modules=modules, architecture=denoiser.architecture,
        categories=list(config.categories), metadata={"safetydpo_recipe": json.dumps(recipe), **(metadata or {})},
    )
