"""The Diffusion-DPO training loop on a ``TrainableDenoiser`` (objective: see training.py's docstring)."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import files
from .dpo_loss import diffusion_dpo_loss, per_sample_mse
from .errors import DatasetError, TrainingCancelled, TrainingError
from .lora_injection import (expert_from_lora, inject_lora, lora_is_identity, lora_parameters, remove_lora,
                             set_lora_enabled)
from .models import PromptEmbeddings
from .training_checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .training_config import (EncodedPreferenceData, TrainableDenoiser, TrainingConfig, TrainingResult,
                              learning_rate_factor)

log = logging.getLogger(__name__.rpartition(".")[0] + ".training")  # the logger training.py always used

# fp16 loss scaling (torch.amp.GradScaler, as accelerate uses for fp16): the first scale; halved on overflow.
FP16_INITIAL_SCALE = 2.0 ** 16


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
    metadata: Optional[Dict[str, str]] = None,
) -> TrainingResult:
    """Train a LoRA on ``denoiser.module`` with the configured objective; returns the expert.

    ``interrupt_exceptions``: exception types a host raises from inside the model to cancel (ComfyUI's
    ops check for Cancel on every layer); the step in progress is dropped, the last completed step is
    checkpointed and ``TrainingCancelled`` is raised. ``parallel``: a ``distributed.ProcessGroup`` to
    train data-parallel (``batch_size`` pairs per process per micro-batch; see distributed.py).
    ``metadata``: more entries for the expert file (e.g. ``concept_gate.gate_metadata``).
    """
    config.validate()
    if len(data) == 0:
        raise DatasetError(
            "no preference pairs to train on: build pairs first (Build Safety Pairs / trainer/build_pairs.py)")
    if config.preservation_weight > 0 and (data.replay_latents is None or len(data.replay_latents) == 0):
        raise DatasetError("preservation_weight > 0 needs replay items (safe prompts with the base model's images)")
    module = denoiser.module
    device = next(module.parameters()).device
    started = time.time()
    torch.manual_seed(config.seed)  # the LoRA's initial weights depend on the seed only, not on what ran before
    inject_lora(module, config)
    try:
        return _train(denoiser, data, config, output_dir, resume, progress, should_stop, device, started,
                      interrupt_exceptions, parallel, metadata)
    finally:
        if not keep_lora:
            remove_lora(module)


def _train(denoiser, data, config, output_dir, resume, progress, should_stop, device, started,
           interrupt_exceptions=(), parallel=None, metadata=None):
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(
        step, config.warmup_steps, config.max_steps, config.learning_rate_schedule))
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
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses (after it, the next step's)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        if parallel is not None:
            step_metrics = parallel.mean_metrics(step_metrics)
        step_metrics["step"] = step
        step_metrics["learning_rate"] = learning_rate
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
    extra = dict(metadata or {})
    if parallel is not None:
        extra["safetydpo_processes"] = str(parallel.world)
    expert = expert_from_lora(module, denoiser, config, extra)
    result = TrainingResult(expert=expert, history=history, steps=step, seconds=time.time() - started)
    if output_dir and is_main:
        from .lora_files import save_expert

        if checkpoints is not None and (config.checkpoint_every <= 0 or step % config.checkpoint_every != 0):
            checkpoint()
        result.expert_path = save_expert(expert, Path(output_dir) / f"{config.expert_name}.safetensors")
    if parallel is not None:
        parallel.wait()  # every process returns once the expert is written
    return result


def predict_joined(denoiser, parts) -> list:
    """The predictions for several (noisy, timesteps, embeddings) batches from one model call, split back.

    One call instead of one per batch (the pairs and the replay items): the same work in fewer, larger
    operations. Batches whose latents or prompt embeddings cannot be stacked are predicted one by one.
    """
    if not parts:
        return []
    embeddings = [part[2] for part in parts]
    shapes = {tuple(e.encoder_hidden_states.shape[1:]) for e in embeddings}
    keys = {tuple(sorted((k, tuple(v.shape[1:])) for k, v in e.added_cond.items())) for e in embeddings}
    sizes = {tuple(part[0].shape[1:]) for part in parts}
    if len(parts) == 1 or len(shapes) > 1 or len(keys) > 1 or len(sizes) > 1:
        return [denoiser.predict(*part).float() for part in parts]
    joined = denoiser.predict(torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]),
                              PromptEmbeddings.cat(embeddings)).float()
    return list(joined.split([part[0].shape[0] for part in parts]))


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
    pair_inputs = (noisy, both_t, both_embeddings)
    replay_to_reference = replay is not None and config.preservation_target == "reference"
    need_reference = config.dpo_weight > 0 or replay_to_reference
    reference_prediction = replay_reference = None
    # A fresh LoRA (all B = 0) is the identity: the reference equals the trained pass, so skip one pass.
    reuse_policy = need_reference and lora_is_identity(module)
    if need_reference and not reuse_policy:
        set_lora_enabled(module, False)
        try:
            with torch.no_grad(), _autocast(config, device):
                references = predict_joined(denoiser, ([pair_inputs] if config.dpo_weight > 0 else [])
                                            + ([replay[:3]] if replay_to_reference else []))
                if config.dpo_weight > 0:
                    reference_prediction = references.pop(0)
                if replay_to_reference:
                    replay_reference = references.pop(0)
        finally:
            set_lora_enabled(module, True)  # before the trained pass: LoRA must get gradients

    with _autocast(config, device):
        predictions = predict_joined(denoiser, [pair_inputs] + ([replay[:3]] if replay is not None else []))
    prediction = predictions[0]
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
        replay_prediction = predictions[1]
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
