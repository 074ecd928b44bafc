"""What one expert's training run works with: its settings, its encoded data, the denoiser, the result."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .errors import TrainingError
from .expert import SafetyExpert
from .models import PromptEmbeddings

OFFICIAL_RECIPE = {"rank": 4, "alpha": 4.0, "target_modules": ("to_q", "to_k", "to_v", "to_out.0"),
                   "dpo_beta": 5000.0, "learning_rate": 1e-5}


LEARNING_RATE_SCHEDULES = ("constant", "cosine")


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up, then constant or a cosine decay to 0 at the end."""
    warmup = max(int(warmup_steps), 0)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        span = max(int(max_steps) - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    return 1.0


@dataclasses.dataclass
class TrainingConfig:
    """Settings of one expert's training run (defaults: see README, chosen on the demo world)."""

    expert_name: str = "safety_expert"
    categories: Sequence[str] = ()
    rank: int = 4
    alpha: float = 4.0
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    learning_rate: float = 1e-4
    max_steps: int = 500
    batch_size: int = 4
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    learning_rate_schedule: str = "constant"  # or "cosine": decays to 0 at max_steps (after the warm-up)
    dpo_beta: float = 5000.0
    dpo_weight: float = 1.0
    sft_weight: float = 0.0
    preservation_weight: float = 0.0
    preservation_target: str = "reference"
    replay_batch_size: int = 4
    timestep_range: Sequence[int] = (0, 1000)
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_bad_steps: int = 5
    prompt_crops: bool = False  # also train each pair under its prompts with leading words left out (pairs.py)

    def validate(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append("rank must be ≥ 1")
        if self.max_steps < 1:
            problems.append("max_steps must be ≥ 1")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            problems.append("batch_size and gradient_accumulation must be ≥ 1")
        if min(self.dpo_weight, self.sft_weight, self.preservation_weight) < 0:
            problems.append("loss weights must be ≥ 0")
        if self.dpo_weight == self.sft_weight == self.preservation_weight == 0:
            problems.append("all loss weights are 0: nothing to train")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append("mixed_precision must be 'no', 'fp16' or 'bf16'")
        if self.learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
            problems.append(f"learning_rate_schedule must be one of {', '.join(LEARNING_RATE_SCHEDULES)}")
        if self.preservation_target not in ("reference", "noise"):
            problems.append("preservation_target must be 'reference' or 'noise'")
        if not (self.learning_rate > 0):
            problems.append("learning_rate must be > 0")
        if problems:
            raise TrainingError("invalid training settings: " + "; ".join(problems))

    def training_pairs(self, pairs):
        """The pairs this run trains on: ``pairs``, with their prompt crops when ``prompt_crops`` is set."""
        return pairs.with_prompt_crops() if self.prompt_crops else pairs

    def to_json(self) -> Dict:
        data = dataclasses.asdict(self)
        data["categories"] = list(self.categories)
        data["target_modules"] = list(self.target_modules)
        data["timestep_range"] = list(self.timestep_range)
        return data


@dataclasses.dataclass
class EncodedPreferenceData:
    """Everything the loop needs, already encoded: latents of winners/losers, prompt embeddings, replay."""

    winner_latents: torch.Tensor  # [N, C, H, W] (preferred, safe rendering)
    loser_latents: torch.Tensor  # [N, C, H, W] (rejected, unsafe rendering)
    embeddings: PromptEmbeddings  # [N, ...] of the (unsafe) prompt both images are trained on
    replay_latents: Optional[torch.Tensor] = None
    replay_embeddings: Optional[PromptEmbeddings] = None

    def __len__(self) -> int:
        return int(self.winner_latents.shape[0])


@dataclasses.dataclass
class TrainableDenoiser:
    """A network to put LoRA on, how to call it, its noise schedule and its module naming."""

    module: torch.nn.Module
    predict: Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor]
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    canonical_name: Callable[[str], str] = lambda name: f"unet.{name}"
    architecture: str = "unknown"

    def add_noise(self, latents, noise, timesteps):
        a = self.alphas_cumprod.to(latents.device)[timesteps].float().reshape(-1, 1, 1, 1)
        return (a.sqrt() * latents + (1 - a).sqrt() * noise).to(latents.dtype)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod.to(latents.device)[timesteps].float().reshape(-1, 1, 1, 1)
            return (a.sqrt() * noise - (1 - a).sqrt() * latents).to(latents.dtype)
        raise TrainingError(f"unsupported prediction type {self.prediction_type!r} (epsilon or v_prediction)")


@dataclasses.dataclass
class TrainingResult:
    expert: SafetyExpert
    history: List[Dict[str, float]]
    expert_path: Optional[Path] = None
    steps: int = 0
    seconds: float = 0.0
