"""Distillation merge: one LoRA taught to predict what each expert predicts on its own concept's inputs and what
the base model predicts on safe inputs.

Every weight-space merge (linear, TIES, Co-Merge, and the per-layer least-squares merge) adds some of every
expert's change to every prompt. On the demo world each expert alone also removed part of the other concepts, and
merged, those side effects reached every prompt: safe prompts changed and concepts were removed only in part.
The prompt gate avoids this at sampling time by applying only the experts whose concept the prompt carries.
This merge puts that behaviour into one LoRA file that any LoRA loader applies:

    minimise over the student LoRA   Σ_k E_{x ~ concept k} ‖f_student(x) − f_{base + w_k ΔW_k}(x)‖²
                                     + λ · E_{x ~ safe} ‖f_student(x) − f_base(x)‖²

where f is the whole denoiser (not one layer: the student learns where in the network to act), "concept k" are
noised images of expert k's preference pairs under their (unsafe) prompts, and "safe" are the replay items (safe
prompts with the base model's own images). A weight w_k = 0 makes concept k's target the base model itself, so
that concept is left as the base model draws it.

The targets are recorded once (``record_distillation_targets``); training the student is plain regression on
them (``merge_by_distillation``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable, List, Optional, Sequence

import torch

from .calibration import expert_applied, expert_fingerprint
from .errors import MergeError, TrainingCancelled
from .expert import SafetyExpert
from .merging import RECIPE_KEY
from .lora_injection import expert_from_lora, inject_lora, lora_parameters, remove_lora
from .models import PromptEmbeddings
from .training_config import EncodedPreferenceData, TrainableDenoiser, TrainingConfig, learning_rate_factor


@dataclasses.dataclass
class DistillationSettings:
    """How the student is taught. Measured on the demo world (docs/demo.md)."""

    steps: int = 1500
    rank: int = 32  # rank 16 left 2.0 % of seed 0's unsafe images at 1500 steps, rank 32 0.3 %
    learning_rate: float = 3e-3
    batch_size: int = 32  # concept samples per step
    replay_batch_size: int = 16  # safe samples per step
    draws: int = 4  # noise and timestep draws per image when the targets are recorded
    preserve_weight: float = 1.0  # λ: the safe inputs' share of the loss against the concepts'
    seed: int = 0

    def validate(self) -> None:
        if min(self.steps, self.rank, self.batch_size, self.replay_batch_size, self.draws) < 1:
            raise MergeError("distillation settings: steps, rank, batch sizes and draws must be ≥ 1")
        if not (self.learning_rate > 0) or self.preserve_weight < 0:
            raise MergeError("distillation settings: learning_rate must be > 0 and preserve_weight ≥ 0")


@dataclasses.dataclass
class DistillationTargets:
    """Recorded model inputs and what the student must predict for them (``safe`` marks the replay rows)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeddings: PromptEmbeddings
    targets: torch.Tensor
    safe: torch.Tensor
    info: dict

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def _predict(denoiser: TrainableDenoiser, noisy, timesteps, embeddings, chunk: int = 64) -> torch.Tensor:
    return torch.cat([denoiser.predict(noisy[i:i + chunk], timesteps[i:i + chunk],
                                       embeddings.index(torch.arange(i, min(i + chunk, len(timesteps))))).float()
                      for i in range(0, len(timesteps), chunk)])


def _draw(denoiser: TrainableDenoiser, latents: torch.Tensor, embeddings: PromptEmbeddings, draws: int,
          generator: torch.Generator):
    """``draws`` noised copies of ``latents`` at random timesteps (with their embeddings, repeated)."""
    count = int(denoiser.alphas_cumprod.shape[0])
    latents = latents.float().repeat(draws, *[1] * (latents.dim() - 1))
    embeddings = PromptEmbeddings.cat([embeddings] * draws)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator)
    return denoiser.add_noise(latents, noise, timesteps), timesteps, embeddings


def record_distillation_targets(
    denoiser: TrainableDenoiser,
    experts: Sequence[SafetyExpert],
    weights: Sequence[float],
    concept_data: Sequence[EncodedPreferenceData],
    module_lookup: Callable[[str], torch.nn.Module],
    settings: Optional[DistillationSettings] = None,
    replay: Optional[EncodedPreferenceData] = None,
) -> DistillationTargets:
    """The teacher's predictions: expert k (at weight w_k) on noised images of its own pairs (both images, under
    the pair's prompt), the base model on noised replay items (safe prompts). ``concept_data[k]`` holds expert k's
    pairs; the replay items come from ``replay`` or else the first dataset that has them."""
    settings = settings or DistillationSettings()
    settings.validate()
    if not (len(experts) == len(weights) == len(concept_data)) or not experts:
        raise MergeError(f"distillation merge: {len(experts)} experts, {len(weights)} weights and "
                         f"{len(concept_data)} pair sets; give one weight and one pair set per expert")
    replay = replay or next((d for d in concept_data if d.replay_latents is not None and len(d.replay_latents)), None)
    if replay is None or replay.replay_latents is None or not len(replay.replay_latents):
        raise MergeError("distillation merge: the pairs have no replay items (safe prompts with the base model's own "
                         "images), so nothing tells the student what to leave unchanged; build them into the "
                         "dataset (trainer/build_pairs.py --replay, or Build Safety Pairs' replay_prompts)")
    generator = torch.Generator().manual_seed(settings.seed)
    parts: List[tuple] = []
    with torch.no_grad():
        for expert, weight, data in zip(experts, weights, concept_data):
            if len(data) == 0:
                raise MergeError(f"distillation merge: expert {expert.name!r} has no pairs to learn it from")
            latents = torch.cat([data.winner_latents, data.loser_latents])
            noisy, timesteps, embeddings = _draw(denoiser, latents, PromptEmbeddings.cat([data.embeddings] * 2),
                                                 settings.draws, generator)
            with expert_applied(expert, module_lookup, strength=float(weight)):
                targets = _predict(denoiser, noisy, timesteps, embeddings)
            parts.append((noisy, timesteps, embeddings, targets, torch.zeros(len(timesteps), dtype=torch.bool)))
        noisy, timesteps, embeddings = _draw(denoiser, replay.replay_latents, replay.replay_embeddings,
                                             settings.draws, generator)
        parts.append((noisy, timesteps, embeddings, _predict(denoiser, noisy, timesteps, embeddings),
                      torch.ones(len(timesteps), dtype=torch.bool)))
    return DistillationTargets(
        noisy=torch.cat([p[0] for p in parts]), timesteps=torch.cat([p[1] for p in parts]),
        embeddings=PromptEmbeddings.cat([p[2] for p in parts]), targets=torch.cat([p[3] for p in parts]),
        safe=torch.cat([p[4] for p in parts]),
        info={"experts": [e.name for e in experts], "weights": [float(w) for w in weights], "draws": settings.draws,
              "concept_samples": int(sum(len(p[1]) for p in parts[:-1])), "safe_samples": int(len(parts[-1][1]))})


def merge_by_distillation(
    denoiser: TrainableDenoiser,
    experts: Sequence[SafetyExpert],
    targets: DistillationTargets,
    settings: Optional[DistillationSettings] = None,
    name: str = "merged_distillation",
    progress: Optional[Callable[[int, int, float], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> SafetyExpert:
    """Train a fresh LoRA (rank ``settings.rank`` on the experts' target modules) on ``targets``; the denoiser's
    network is left as it was, also on error or Cancel."""
    settings = settings or DistillationSettings()
    settings.validate()
    module = denoiser.module
    targets_modules = sorted({t for e in experts for t in e.target_modules})
    config = TrainingConfig(expert_name=name, rank=settings.rank, alpha=float(settings.rank),
                            target_modules=tuple(targets_modules),
                            categories=tuple(dict.fromkeys(c for e in experts for c in e.categories)))
    concept_rows = (~targets.safe).nonzero().flatten()
    safe_rows = targets.safe.nonzero().flatten()
    if not len(concept_rows) or not len(safe_rows):
        raise MergeError("distillation merge: the targets need both concept and safe samples")
    generator = torch.Generator().manual_seed(settings.seed)
    frozen = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    started = time.time()
    inject_lora(module, config)
    try:
        parameters = list(lora_parameters(module).values())
        optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, 0, settings.steps, "cosine"))
        device = next(iter(parameters)).device
        for step in range(settings.steps):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"distillation merge cancelled at step {step} of {settings.steps}")
            rows = torch.cat([concept_rows[torch.randint(0, len(concept_rows), (settings.batch_size,),
                                                         generator=generator)],
                              safe_rows[torch.randint(0, len(safe_rows), (settings.replay_batch_size,),
                                                      generator=generator)]])
            prediction = denoiser.predict(targets.noisy[rows].to(device), targets.timesteps[rows].to(device),
                                          targets.embeddings.index(rows).to(device)).float()
            error = (prediction - targets.targets[rows].to(device)).pow(2).flatten(1).mean(1)
            loss = error[:settings.batch_size].mean() + settings.preserve_weight * error[settings.batch_size:].mean()
            if not torch.isfinite(loss):
                raise MergeError(f"distillation merge: the loss became {float(loss)} at step {step}; lower "
                                 "learning_rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            if progress is not None:
                progress(step + 1, settings.steps, float(loss.detach()))
        student = expert_from_lora(module, denoiser, config)
    finally:
        remove_lora(module)
        for parameter, requires_grad in frozen:
            parameter.requires_grad_(requires_grad)
    final_loss = float(loss.detach())
    recipe = {"method": "distillation", **dataclasses.asdict(settings), "experts": [e.name for e in experts],
              "weights": dict(zip(targets.info["experts"], targets.info["weights"])),
              "expert_fingerprints": {e.name: expert_fingerprint(e) for e in experts},
              "seconds": round(time.time() - started, 1),
              "final_loss": final_loss if math.isfinite(final_loss) else None}
    student.metadata = {RECIPE_KEY: json.dumps(recipe)}
    return student


def _trained_with_prompt_crops(expert: SafetyExpert) -> bool:
    try:
        return bool(json.loads(expert.metadata.get(RECIPE_KEY, "{}")).get("prompt_crops", False))
    except (ValueError, AttributeError):
        return False


def expert_pair_sets(experts: Sequence[SafetyExpert], pairs) -> list:
    """Each expert's pairs: those of its own categories, with the prompt crops it was trained with."""
    sets = []
    for expert in experts:
        chosen = [c for c in expert.categories if c in pairs.categories]
        if not chosen:
            raise MergeError(f"expert {expert.name!r} is for {expert.categories or 'no recorded category'}, but the "
                             f"pairs dataset holds {pairs.categories}: give the dataset the experts were trained on")
        subset = pairs.select(chosen)
        sets.append(subset.with_prompt_crops() if _trained_with_prompt_crops(expert) else subset)
    return sets


def distill_experts(bundle, experts: Sequence[SafetyExpert], weights: Sequence[float], pairs,
                    settings: Optional[DistillationSettings] = None, cache_dir=None, name: str = "merged_distillation",
                    progress: Optional[Callable[[int, int, float], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None) -> SafetyExpert:
    """The distillation merge on a ``DiffusionBundle`` and the pairs dataset the experts were trained from: each
    expert learns from the pairs of its own categories (with the prompt crops it was trained with), and the
    dataset's replay items say what must not change."""
    from .calibration import diffusers_module_lookup
    from .encoding_cache import encode_preference_pairs
    from .training import denoiser_for_bundle

    data = [encode_preference_pairs(bundle, subset, cache_dir) for subset in expert_pair_sets(experts, pairs)]
    denoiser = denoiser_for_bundle(bundle)
    frozen = [(p, p.requires_grad) for p in bundle.unet.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    try:
        targets = record_distillation_targets(denoiser, experts, weights, data, diffusers_module_lookup(bundle.unet),
                                              settings)
        return merge_by_distillation(denoiser, experts, targets, settings, name=name, progress=progress,
                                     should_stop=should_stop)
    finally:
        for parameter, requires_grad in frozen:
            parameter.requires_grad_(requires_grad)
