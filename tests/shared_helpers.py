"""Helpers shared by several test files: loading a script by path, random LoRA experts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from comfyui_safetydpo.expert import LoraModule, SafetyExpert

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str):
    """Import a command line or bench script (``trainer/train.py``, ``bench/bench_gpu.py``) by its path."""
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def random_expert(name: str, modules: Mapping[str, Sequence], seed: int = 0, rank: int = 2,
                  alpha: Optional[float] = None, scale: float = 1.0, architecture: str = "sd15",
                  categories: Optional[Sequence[str]] = None, metadata: Optional[Mapping[str, str]] = None
                  ) -> SafetyExpert:
    """A SafetyExpert with Gaussian LoRA factors, drawn module by module (down, then up) from ``seed``.

    ``modules``: name → weight shape ``(out, in)`` or ``(out, in, k, k)`` (a conv LoRA), or
    ``(shape, rank, alpha)`` to give that module its own rank and alpha. ``alpha`` defaults to the rank;
    ``scale`` multiplies every up-projection; ``categories`` default to ``[name.capitalize()]``.
    """
    generator = torch.Generator().manual_seed(seed)
    built = {}
    for module, spec in modules.items():
        shape, module_rank, module_alpha = spec if isinstance(spec[0], (tuple, list)) else (spec, rank, alpha)
        out_features, in_features, *kernel = shape
        down = torch.randn(module_rank, in_features, *kernel, generator=generator)
        up = scale * torch.randn(out_features, module_rank, *([1, 1] if kernel else []), generator=generator)
        built[module] = LoraModule(down, up, float(module_rank) if module_alpha is None else module_alpha)
    return SafetyExpert(name=name, modules=built, architecture=architecture,
                        categories=list(categories) if categories is not None else [name.capitalize()],
                        metadata=dict(metadata or {}))
