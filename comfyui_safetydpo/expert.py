"""The safety expert: a LoRA (plus optional full weight differences) with what it is for.

Module names are canonical everywhere in the library:
``unet.<diffusers module path>`` (for example ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``),
``text_encoder.<transformers module path>`` and, for SDXL, ``text_encoder_2.<path>``.
File formats (kohya, ComfyUI native, PEFT/diffusers) are converted to and from these names in
``lora_files``; nothing else needs to know about key spellings.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from .errors import ArchitectureMismatchError, LoraFormatError

ARCHITECTURES = ("sd15", "sd21", "sdxl", "demo", "unknown")
"""Base architectures an expert can be made for. ``demo`` is the built-in demo world's model."""


@dataclasses.dataclass
class LoraModule:
    """One low-rank update ΔW = (alpha / rank) · up @ down for a Linear or Conv2d weight.

    ``down`` is [rank, in] (or [rank, in, kh, kw] for convolutions) and ``up`` is [out, rank]
    (or [out, rank, 1, 1]); ``alpha`` is kept explicitly because a missing alpha means scale 1.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the base weight this module updates."""
        if self.down.dim() == 2:
            return torch.Size((self.up.shape[0], self.down.shape[1]))
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW in the base weight's shape, computed in ``dtype``."""
        down = self.down.to(dtype)
        up = self.up.to(dtype)
        if down.dim() == 2:
            return self.scale * (up @ down)
        # Conv LoRA: down is a k×k conv to rank channels, up a 1×1 conv back.
        up2 = up.reshape(up.shape[0], -1)
        down2 = down.reshape(down.shape[0], -1)
        return self.scale * (up2 @ down2).reshape(self.weight_shape)


@dataclasses.dataclass
class SafetyExpert:
    """A LoRA expert for one or more harm categories / concepts.

    ``modules`` holds low-rank updates; ``diffs`` holds full-rank weight differences (what
    element-wise Co-Merge produces). Both are keyed by canonical module names.
    """

    name: str
    modules: Dict[str, LoraModule] = dataclasses.field(default_factory=dict)
    diffs: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    architecture: str = "unknown"
    categories: List[str] = dataclasses.field(default_factory=list)
    metadata: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ArchitectureMismatchError(
                f"expert {self.name!r}: unknown base architecture {self.architecture!r}; "
                f"expected one of {', '.join(ARCHITECTURES)}"
            )

    @property
    def module_names(self) -> List[str]:
        """Every module the expert changes, low-rank or full difference, sorted."""
        return sorted(set(self.modules) | set(self.diffs))

    @property
    def rank(self) -> Optional[int]:
        """The largest LoRA rank among the modules (None for a diff-only expert)."""
        return max((m.rank for m in self.modules.values()), default=None)

    @property
    def alpha(self) -> Optional[float]:
        """The alpha shared by all modules, or None when modules differ or there are none."""
        alphas = {float(m.alpha) for m in self.modules.values()}
        return alphas.pop() if len(alphas) == 1 else None

    @property
    def target_modules(self) -> List[str]:
        """The distinct leaf names targeted, e.g. ``['to_k', 'to_out.0', 'to_q', 'to_v']``."""
        leaves = set()
        for name in self.module_names:
            parts = name.split(".")
            leaf = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
            leaves.add(leaf)
        return sorted(leaves)

    @property
    def has_text_encoder(self) -> bool:
        return any(n.startswith("text_encoder") for n in self.module_names)

    def delta_weight(self, module_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW for one module: its low-rank update plus its full difference, if any."""
        if module_name not in self.modules and module_name not in self.diffs:
            raise LoraFormatError(f"expert {self.name!r} has no module {module_name!r}")
        total = None
        if module_name in self.modules:
            total = self.modules[module_name].delta_weight(dtype)
        if module_name in self.diffs:
            diff = self.diffs[module_name].to(dtype)
            total = diff if total is None else total + diff
        return total

    def delta_weights(self, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """ΔW for every module."""
        return {name: self.delta_weight(name, dtype) for name in self.module_names}

    def describe(self) -> str:
        """A one-line human summary (used by nodes and the command line)."""
        cats = ", ".join(self.categories) if self.categories else "no categories"
        rank = f"rank {self.rank}" if self.rank is not None else "full-rank diffs"
        return (
            f"{self.name}: {cats}; {self.architecture}; {len(self.module_names)} modules; {rank}"
        )
