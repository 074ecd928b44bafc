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
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import files
from .dpo_loss import diffusion_dpo_loss, per_sample_mse
from .errors import DatasetError, TrainingCancelled, TrainingError
from .expert import LoraModule, SafetyExpert
from .models import PromptEmbeddings

log = logging.getLogger(__name__)

# fp16 loss scaling (torch.amp.GradScaler, as accelerate uses for fp16): the first scale; halved on overflow.
FP16_INITIAL_SCALE = 2.0 ** 16

OFFICIAL_RECIPE = {"rank": 4, "alpha": 4.0, "target_modules": ("to_q", "to_k", "to_v", "to_out.0"),
                   "dpo_beta": 5000.0, "learning_rate": 1e-5}


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
        if self.preservation_target not in ("reference", "noise"):
            problems.append("preservation_target must be 'reference' or 'noise'")
        if not (self.learning_rate > 0):
            problems.append("learning_rate must be > 0")
        if problems:
            raise TrainingError("invalid training settings: " + "; ".join(problems))

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


# -- LoRA on any module tree -------------------------------------------------------------------

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


# -- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(folder: Path, module, optimizer, scheduler, state: Dict, generator: torch.Generator,
                    keep: int = 2) -> Path:
    """Write a checkpoint atomically: a temp folder renamed into place, then the ``latest`` pointer."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*"):  # temp folders of a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    step = state["step"]
    final = folder / f"step_{step:07d}"
    failed = {"error": TrainingError, "what": f"checkpoint of step {step}",
              "advice": "free disk space (or choose another output folder) and resume: the previous checkpoint is intact"}
    with files.atomic_folder(final, **failed) as temp:
        _write_checkpoint_files(temp, module, optimizer, scheduler, state, generator)
    files.write_text(folder / "latest", final.name, **failed)
    existing = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint_files(temp: Path, module, optimizer, scheduler, state: Dict, generator) -> None:
    from safetensors.torch import save_file

    lora = {n: p.detach().cpu().contiguous() for n, p in lora_parameters(module).items()}
    save_file(lora, str(temp / "lora.safetensors"))
    optimizer_tensors, optimizer_index = {}, {}
    for index, (param_name, param) in enumerate(lora_parameters(module).items()):
        param_state = optimizer.state.get(param, {})
        for key, value in param_state.items():
            if torch.is_tensor(value):
                optimizer_tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                optimizer_index[f"{index}.{key}"] = value
    if optimizer_tensors:
        save_file(optimizer_tensors, str(temp / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state(), "generator": generator.get_state()},
              str(temp / "rng.safetensors"))
    numpy_state = np.random.get_state()
    payload = {
        **state,
        "optimizer_scalars": optimizer_index,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_rng": repr(random.getstate()),
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (temp / "state.json").write_text(json.dumps(payload))


def latest_checkpoint(folder: Path) -> Optional[Path]:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    candidate = folder / pointer.read_text().strip()
    if (candidate / "state.json").is_file() and (candidate / "lora.safetensors").is_file():
        return candidate
    # The pointer names a folder that is gone or incomplete: fall back to the newest complete one.
    complete = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file() and (p / "lora.safetensors").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, module, optimizer, scheduler, generator: torch.Generator) -> Dict:
    import ast

    from .lora_files import read_safetensors

    lora, _ = read_safetensors(path / "lora.safetensors")
    params = lora_parameters(module)
    if set(lora) != set(params) or any(lora[n].shape != params[n].shape for n in lora):
        raise TrainingError(f"{path}: the checkpoint's LoRA does not match this run's settings "
                            "(rank, targets or model changed); start a new output folder or use the same settings")
    with torch.no_grad():
        for name, tensor in lora.items():
            params[name].copy_(tensor)
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step recorded")
    except (OSError, ValueError) as error:
        raise TrainingError(f"{path / 'state.json'}: damaged checkpoint state ({error}); delete the folder "
                            f"{path.name} to resume from the one before, or start a new output folder") from None
    if (path / "optimizer.safetensors").is_file():
        optimizer_tensors, _ = read_safetensors(path / "optimizer.safetensors")
    else:
        optimizer_tensors = {}
    for index, (param_name, param) in enumerate(params.items()):
        entry = {}
        for key, value in optimizer_tensors.items():
            i, field = key.split(".", 1)
            if int(i) == index:
                entry[field] = value.clone()
        for key, value in state.get("optimizer_scalars", {}).items():
            i, field = key.split(".", 1)
            if int(i) == index:
                entry[field] = value
        if entry:
            optimizer.state[param] = entry
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng, _ = read_safetensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_rng"])
    generator.set_state(rng["generator"])
    random.setstate(ast.literal_eval(state["python_rng"]))
    numpy_state = state["numpy_rng"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    return state


# -- the loop ----------------------------------------------------------------------------------

def _batch_indices(count: int, batch: int, epoch: int, position: int, seed: int) -> List[int]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [order[(position + i) % count] for i in range(batch)]


def _autocast(config: TrainingConfig, device: torch.device):
    if config.mixed_precision == "no":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_lora(
    denoiser: TrainableDenoiser,
    data: EncodedPreferenceData,
    config: TrainingConfig,
    output_dir: Optional[Path] = None,
    resume: bool = False,
    progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    keep_lora: bool = False,
    interrupt_exceptions: tuple = (),
    parallel=None,
) -> TrainingResult:
    """Train a LoRA on ``denoiser.module`` with the configured objective; returns the expert.

    ``interrupt_exceptions``: exception types a host raises from inside the model to cancel (ComfyUI's
    ops check for Cancel on every layer); the step in progress is dropped, the last completed step is
    checkpointed and ``TrainingCancelled`` is raised. ``parallel``: a ``distributed.ProcessGroup`` to
    train data-parallel (``batch_size`` pairs per process per micro-batch; see distributed.py).
    """
    config.validate()
    if len(data) == 0:
        raise DatasetError("no preference pairs to train on: build pairs first (Build Safety Pairs / trainer/build_pairs.py)")
    if config.preservation_weight > 0 and (data.replay_latents is None or len(data.replay_latents) == 0):
        raise DatasetError("preservation_weight > 0 needs replay items (safe prompts with the base model's images)")
    module = denoiser.module
    device = next(module.parameters()).device
    started = time.time()
    torch.manual_seed(config.seed)  # the LoRA's initial weights depend on the seed only, not on what ran before
    inject_lora(module, config)
    try:
        return _train(denoiser, data, config, output_dir, resume, progress, should_stop, device, started,
                      interrupt_exceptions, parallel)
    finally:
        if not keep_lora:
            remove_lora(module)


def _train(denoiser, data, config, output_dir, resume, progress, should_stop, device, started,
           interrupt_exceptions=(), parallel=None):
    module = denoiser.module
    is_main = parallel is None or parallel.is_main  # only the main process writes files
    batches = config  # batch sizes of one step: per process × processes when data-parallel
    if parallel is not None:
        batches = dataclasses.replace(config, batch_size=config.batch_size * parallel.world,
                                      replay_batch_size=config.replay_batch_size * parallel.world)
        parallel.check_sizes(len(data), 0 if data.replay_latents is None else len(data.replay_latents),
                             config.batch_size, config.replay_batch_size, config.preservation_weight > 0)
    if config.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    params = list(lora_parameters(module).values())
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(config.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INITIAL_SCALE,
                                  enabled=config.mixed_precision == "fp16")  # a no-op unless fp16
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % (2**32))
    checkpoints = Path(output_dir) / "checkpoints" if output_dir else None
    step, epoch, position, bad_steps = 0, 0, 0, 0
    history: List[Dict[str, float]] = []
    if resume and checkpoints is not None:
        found = latest_checkpoint(checkpoints)
        if found is not None:
            state = load_checkpoint(found, module, optimizer, scheduler, generator)
            step, epoch, position = state["step"], state["epoch"], state["position"]
            history = state.get("history", [])
            if scaler.is_enabled() and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])
            log.info("resumed from %s at step %d", found, step)
    if parallel is not None:
        parallel.start_together(params, step)
    metrics_file = None
    board = None
    if output_dir and is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        metrics_file = Path(output_dir) / "metrics.csv"
        if not resume and metrics_file.exists():
            metrics_file.unlink()
        elif resume and metrics_file.exists():
            _truncate_metrics(metrics_file, step)  # steps after the checkpoint are replayed: no duplicate rows
        board = _tensorboard_writer(Path(output_dir) / "tensorboard")

    def checkpoint():
        if checkpoints is None or not is_main:
            return
        save_checkpoint(checkpoints, module, optimizer, scheduler,
                        {"step": step, "epoch": epoch, "position": position, "history": history,
                         "config": config.to_json(), "grad_scaler": scaler.state_dict()}, generator,
                        config.keep_checkpoints)

    count = len(data)
    low, high = int(config.timestep_range[0]), int(config.timestep_range[1])
    while step < config.max_steps:
        if should_stop is not None and should_stop():
            checkpoint()
            raise TrainingCancelled(f"training cancelled at step {step}; the checkpoint was kept"
                                    + (f" in {checkpoints}" if checkpoints else ""))
        optimizer.zero_grad(set_to_none=True)
        step_metrics: Dict[str, float] = {}
        finite = True
        step_start = (epoch, position, generator.get_state(), torch.get_rng_state())
        try:
            for _ in range(config.gradient_accumulation):
                batch = min(batches.batch_size, count)
                indices = _batch_indices(count, batch, epoch, position, config.seed)
                position += batch
                if position >= count:
                    epoch, position = epoch + 1, position - count
                loss, metrics = _objective(denoiser, data, batches, indices, generator, device, low, high, parallel)
                if not torch.isfinite(loss):
                    finite = False
                    if parallel is None:
                        break
                    continue  # data-parallel: draw the same batches as the other processes, skip the step together
                scaler.scale(loss / config.gradient_accumulation).backward()
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value / config.gradient_accumulation
        except interrupt_exceptions as error:
            # Cancelled inside the step: drop it, so the checkpoint is exactly the last completed step.
            optimizer.zero_grad(set_to_none=True)
            epoch, position = step_start[0], step_start[1]
            generator.set_state(step_start[2])
            torch.set_rng_state(step_start[3])
            checkpoint()
            raise TrainingCancelled(f"training cancelled during step {step + 1}; the checkpoint of step {step} "
                                    "was kept" + (f" in {checkpoints}" if checkpoints else "")) from error
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory at batch size {config.batch_size}: lower batch_size (use gradient_accumulation "
                "to keep the effective batch), enable gradient_checkpointing or mixed_precision, or lower the "
                "resolution") from None
        if parallel is not None:
            finite = parallel.sync_gradients(params, finite)  # averaged over processes; finite on all
        losses_finite = finite
        if finite and scaler.is_enabled():
            scaler.unscale_(optimizer)
        if finite:
            finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if losses_finite and scaler.is_enabled():
                overflowed_at = scaler.get_scale()
                scaler.update()  # fp16 loss-scale overflow: halve the scale; not a bad step while the scale > 1
                if overflowed_at > 1.0:
                    log.info("fp16 gradient overflow at step %d: loss scale lowered to %g", step, scaler.get_scale())
                    continue
            bad_steps += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step, bad_steps)
            if bad_steps >= config.max_bad_steps:
                checkpoint()
                raise TrainingError(
                    f"the loss was NaN/Inf for {bad_steps} steps in a row (at step {step}); lower learning_rate "
                    "or dpo_beta, or use mixed_precision='no'. The last good checkpoint was kept.")
            continue
        bad_steps = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm > 0 else None
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        if parallel is not None:
            step_metrics = parallel.mean_metrics(step_metrics)
        step_metrics["step"] = step
        step_metrics["learning_rate"] = scheduler.get_last_lr()[0]
        if grad_norm is not None:
            step_metrics["grad_norm"] = float(grad_norm)
        history.append(step_metrics)
        if metrics_file is not None:
            _append_metrics(metrics_file, step_metrics)
        if board is not None:
            for key, value in step_metrics.items():
                board.add_scalar(f"train/{key}", value, step)
        if progress is not None:
            progress(step, config.max_steps, step_metrics)
        if checkpoints is not None and config.checkpoint_every > 0 and step % config.checkpoint_every == 0:
            checkpoint()
    expert = expert_from_lora(module, denoiser, config,
                              {"safetydpo_processes": str(parallel.world)} if parallel is not None else None)
    result = TrainingResult(expert=expert, history=history, steps=step, seconds=time.time() - started)
    if output_dir and is_main:
        from .lora_files import save_expert

        if checkpoints is not None and (config.checkpoint_every <= 0 or step % config.checkpoint_every != 0):
            checkpoint()
        result.expert_path = save_expert(expert, Path(output_dir) / f"{config.expert_name}.safetensors")
    if parallel is not None:
        parallel.wait()  # every process returns once the expert is written
    return result


def _objective(denoiser, data, config, indices, generator, device, low, high, parallel=None):
    module = denoiser.module
    index = torch.tensor(indices)
    noise = torch.randn((len(indices), *data.winner_latents.shape[1:]), generator=generator)
    timesteps = torch.randint(low, high, (len(indices),), generator=generator)
    pair_weight = replay_weight = 1.0
    if parallel is not None:  # noise and t were drawn for the global batch: this process takes its part
        part, pair_weight = parallel.shard(len(indices))
        index, noise, timesteps = index[part], noise[part], timesteps[part]
    winners = data.winner_latents[index].to(device)
    losers = data.loser_latents[index].to(device)
    embeddings = data.embeddings.index(index).to(device)
    batch = winners.shape[0]
    noise, timesteps = noise.to(device), timesteps.to(device)
    latents = torch.cat([winners, losers])
    both_noise = torch.cat([noise, noise])  # same noise and timestep for winner and loser
    both_t = torch.cat([timesteps, timesteps])
    noisy = denoiser.add_noise(latents, both_noise, both_t)
    target = denoiser.target(latents, both_noise, both_t)
    both_embeddings = PromptEmbeddings.cat([embeddings, embeddings])

    replay = None
    if config.preservation_weight > 0:
        count = data.replay_latents.shape[0]
        replay_index = torch.randint(0, count, (min(config.replay_batch_size, count),), generator=generator)
        replay_noise = torch.randn((len(replay_index), *data.replay_latents.shape[1:]), generator=generator)
        replay_t = torch.randint(low, high, (len(replay_index),), generator=generator)
        if parallel is not None:
            part, replay_weight = parallel.shard(len(replay_index))
            replay_index, replay_noise, replay_t = replay_index[part], replay_noise[part], replay_t[part]
        replay_latents = data.replay_latents[replay_index].to(device)
        replay_noise, replay_t = replay_noise.to(device), replay_t.to(device)
        replay = (denoiser.add_noise(replay_latents, replay_noise, replay_t), replay_t,
                  data.replay_embeddings.index(replay_index).to(device),
                  denoiser.target(replay_latents, replay_noise, replay_t))

    metrics: Dict[str, float] = {}
    need_reference = config.dpo_weight > 0 or (replay is not None and config.preservation_target == "reference")
    reference_prediction = replay_reference = None
    # A fresh LoRA (all B = 0) is the identity: the reference equals the trained pass, so skip one pass.
    reuse_policy = need_reference and lora_is_identity(module)
    if need_reference and not reuse_policy:
        set_lora_enabled(module, False)
        try:
            with torch.no_grad(), _autocast(config, device):
                if config.dpo_weight > 0:
                    reference_prediction = denoiser.predict(noisy, both_t, both_embeddings).float()
                if replay is not None and config.preservation_target == "reference":
                    replay_reference = denoiser.predict(replay[0], replay[1], replay[2]).float()
        finally:
            set_lora_enabled(module, True)  # before the trained pass: LoRA must get gradients

    with _autocast(config, device):
        prediction = denoiser.predict(noisy, both_t, both_embeddings).float()
    if reuse_policy and config.dpo_weight > 0:
        reference_prediction = prediction.detach()
    mse = per_sample_mse(prediction, target)
    model_w, model_l = mse[:batch], mse[batch:]
    loss = torch.zeros((), device=device)
    if config.dpo_weight > 0:
        reference_mse = per_sample_mse(reference_prediction, target)
        dpo, dpo_metrics = diffusion_dpo_loss(model_w, model_l, reference_mse[:batch], reference_mse[batch:],
                                              config.dpo_beta)
        loss = loss + config.dpo_weight * pair_weight * dpo
        metrics.update(dpo_metrics)
    else:
        metrics.update({"model_mse_winner": float(model_w.detach().mean()),
                        "model_mse_loser": float(model_l.detach().mean())})
    if config.sft_weight > 0:
        sft = model_w.mean()
        loss = loss + config.sft_weight * pair_weight * sft
        metrics["sft_loss"] = float(sft.detach())
    if replay is not None:
        with _autocast(config, device):
            replay_prediction = denoiser.predict(replay[0], replay[1], replay[2]).float()
        if reuse_policy and config.preservation_target == "reference":
            replay_reference = replay_prediction.detach()
        target_replay = replay_reference if config.preservation_target == "reference" else replay[3]
        preservation = per_sample_mse(replay_prediction, target_replay).mean()
        loss = loss + config.preservation_weight * replay_weight * preservation
        metrics["preservation_loss"] = float(preservation.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def _tensorboard_writer(folder: Path):
    """A TensorBoard writer when ``tensorboard`` is installed (optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of steps up to ``step`` (atomic rewrite)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
        fields = rows[0].keys() if rows else []
    kept = [r for r in rows if r.get("step") and float(r["step"]) <= step]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(kept)
    files.write_text(path, buffer.getvalue(), error=TrainingError, what="metrics")


def _append_metrics(path: Path, metrics: Dict[str, float]) -> None:
    exists = path.exists()
    fields = sorted(metrics)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if not exists:
            writer.writeheader()
        writer.writerow(metrics)


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
        return diffusion_model(noisy, timesteps=timesteps.float(), context=embeddings.encoder_hidden_states.to(noisy.dtype),
                               **kwargs)

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
    from .encoding_cache import encode_preference_pairs

    if cache_dir is None and output_dir is not None:
        cache_dir = Path(output_dir) / "cache"
    data = encode_preference_pairs(bundle, pairs, cache_dir, lazy=True)  # each pair encoded on first use
    if config.categories == () and getattr(pairs, "categories", None):
        config = dataclasses.replace(config, categories=tuple(pairs.categories))
    for p in bundle.unet.parameters():
        p.requires_grad_(False)
    return train_lora(denoiser_for_bundle(bundle), data, config, output_dir, resume, progress, should_stop,
                      parallel=parallel)


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
