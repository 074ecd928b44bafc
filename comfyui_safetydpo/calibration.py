"""Calibration statistics for Co-Merge: how active each expert is, per layer, on real inputs.

For each expert k, the base model runs with expert k alone on calibration inputs (prompts of every
category, noisy latents at sampled timesteps). At each LoRA layer we record the mean absolute branch
output per output unit, ``row_activation = E|y_k[j]|`` with ``y_k = ΔW_k x``, and the mean squared
input per input unit, ``input_sq_mean = E x_i²`` (for element-wise Co-Merge; per input channel for
convolutions).

Statistics are saved to safetensors with fingerprints of the experts they were measured with, so a
re-merge with new weights needs no model pass, and statistics of other experts are refused.

``collect_statistics`` works on any torch module tree: the caller gives ``run_model()`` (runs the
base model on calibration inputs) and ``module_lookup(canonical_name) -> nn.Module``;
``diffusers_module_lookup`` and ``calibrate_diffusers_unet`` do this for a diffusers UNet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from . import files
from .errors import MergeError
from .expert import SafetyExpert

STATISTICS_KIND = "co_merge_statistics"


def expert_fingerprint(expert: SafetyExpert) -> str:
    """A short hash of the expert's weights (module names, shapes, values and alphas)."""
    digest = hashlib.sha256()
    for name in sorted(expert.modules):
        module = expert.modules[name]
        digest.update(name.encode())
        for tensor in (module.down, module.up):
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(repr(float(module.alpha)).encode())
    for name in sorted(expert.diffs):
        digest.update(f"diff:{name}".encode())
        digest.update(repr(tuple(expert.diffs[name].shape)).encode())
        digest.update(expert.diffs[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class ModuleStatistics:
    """One layer, one expert: E|y[j]| per output unit, E x_i² per input unit, and how many vectors."""

    row_activation: torch.Tensor  # [out]
    input_sq_mean: torch.Tensor  # [in] (input channels for convolutions)
    samples: int


@dataclasses.dataclass
class CalibrationStatistics:
    """Per expert (by name), per canonical module: activation statistics, plus expert fingerprints."""

    experts: Dict[str, Dict[str, ModuleStatistics]]
    fingerprints: Dict[str, str]
    info: Dict[str, object] = dataclasses.field(default_factory=dict)

    def for_expert(self, expert: SafetyExpert, fingerprint: Optional[str] = None) -> Dict[str, ModuleStatistics]:
        """This expert's statistics; refuses statistics measured with other weights.

        ``fingerprint``: the expert's ``expert_fingerprint`` if the caller has it already.
        """
        if expert.name not in self.experts:
            raise MergeError(
                f"the calibration statistics have no entry for expert {expert.name!r} (they cover "
                f"{sorted(self.experts)}); compute statistics for these experts first")
        if self.fingerprints.get(expert.name) != (fingerprint or expert_fingerprint(expert)):
            raise MergeError(
                f"the calibration statistics for {expert.name!r} were measured with other weights "
                "(the expert file changed or another expert has this name); recompute the statistics")
        stats = self.experts[expert.name]
        missing = sorted(set(expert.module_names) - set(stats))
        if missing:
            raise MergeError(f"statistics for {expert.name!r} lack module {missing[0]!r}; recompute them")
        return stats

    def check_experts(self, experts: Sequence[SafetyExpert]) -> None:
        """Raise MergeError unless these statistics were measured with exactly these experts' weights."""
        for expert in experts:
            self.for_expert(expert)

    def content_hash(self) -> str:
        """A short hash of every statistic and fingerprint (recorded in merge recipes)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.fingerprints, sort_keys=True).encode())
        for name in sorted(self.experts):
            for module in sorted(self.experts[name]):
                stats = self.experts[name][module]
                digest.update(f"{name}/{module}/{stats.samples}".encode())
                digest.update(stats.row_activation.detach().float().cpu().contiguous().numpy().tobytes())
                digest.update(stats.input_sq_mean.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path) -> Path:
        """Atomic safetensors file: tensors per expert/module, names and fingerprints in metadata."""
        tensors = {}
        names = sorted(self.experts)
        samples = {}
        for index, name in enumerate(names):
            for module, stats in self.experts[name].items():
                tensors[f"{index}/{module}/row_activation"] = stats.row_activation.detach().float().cpu().contiguous()
                tensors[f"{index}/{module}/input_sq_mean"] = stats.input_sq_mean.detach().float().cpu().contiguous()
                samples[f"{index}/{module}"] = int(stats.samples)
        metadata = {
            "safetydpo_kind": STATISTICS_KIND,
            "experts": json.dumps(names),
            "fingerprints": json.dumps(self.fingerprints),
            "samples": json.dumps(samples),
            "info": json.dumps(self.info, default=str),
        }
        return files.save_safetensors(path, tensors, metadata, error=MergeError, what="statistics")

    @staticmethod
    def load(path) -> "CalibrationStatistics":
        """Read a file written by ``save``; anything else is refused with a message naming the file."""
        from .files import read_safetensors

        tensors, metadata = read_safetensors(path)
        if metadata.get("safetydpo_kind") != STATISTICS_KIND:
            raise MergeError(f"{path}: not a Co-Merge statistics file (compute one with "
                             "`python trainer/merge.py statistics ...` or the statistics node)")
        try:
            names = json.loads(metadata["experts"])
            fingerprints = json.loads(metadata["fingerprints"])
            samples = json.loads(metadata.get("samples", "{}"))
            info = json.loads(metadata.get("info", "{}"))
            experts: Dict[str, Dict[str, ModuleStatistics]] = {name: {} for name in names}
            for key in tensors:
                index, rest = key.split("/", 1)
                module, field = rest.rsplit("/", 1)
                if field == "input_sq_mean":
                    continue
                if field != "row_activation":
                    raise KeyError(key)
                experts[names[int(index)]][module] = ModuleStatistics(
                    tensors[key], tensors[f"{index}/{module}/input_sq_mean"], int(samples.get(f"{index}/{module}", 0)))
        except (KeyError, ValueError, IndexError, json.JSONDecodeError) as error:
            raise MergeError(f"{path}: the statistics file is damaged (bad or missing entry {error}); "
                             "recompute it") from None
        return CalibrationStatistics(experts, fingerprints, info)


class _Accumulator:
    """Running sums of |y| per output unit and x² per input unit."""

    def __init__(self):
        self.row_sum = None
        self.row_count = 0
        self.sq_sum = None
        self.sq_count = 0

    def add(self, row_abs: torch.Tensor, rows: int, sq: torch.Tensor, count: int):
        self.row_sum = row_abs if self.row_sum is None else self.row_sum + row_abs
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.row_count += rows
        self.sq_count += count

    def result(self) -> ModuleStatistics:
        return ModuleStatistics((self.row_sum / max(self.row_count, 1)).cpu(),
                                (self.sq_sum / max(self.sq_count, 1)).cpu(), self.row_count)


def _branch(expert: SafetyExpert, name: str, module: torch.nn.Module):
    """A function x -> y = ΔW x for one layer; from the LoRA factors when that is cheaper than ΔW."""
    if isinstance(module, torch.nn.Conv2d):
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if name in expert.modules and name not in expert.diffs and module.groups == 1:
            lora = expert.modules[name]
            down, up = lora.down.float(), (lora.scale * lora.up.float()).reshape(lora.up.shape[0], lora.rank, 1, 1)
            return lambda x: F.conv2d(F.conv2d(x, down.to(x.device), None, **conv), up.to(x.device))
        delta = expert.delta_weight(name).reshape(module.weight.shape)
        return lambda x: F.conv2d(x, delta.to(x.device), None, groups=module.groups, **conv)
    if name in expert.modules and name not in expert.diffs:
        lora = expert.modules[name]
        out_features, in_features = lora.weight_shape
        if lora.rank * (out_features + in_features) < out_features * in_features:
            down_t, up_t = lora.down.float().t(), (lora.scale * lora.up.float()).t()
            return lambda x: (x @ down_t.to(x.device)) @ up_t.to(x.device)
    delta_t = expert.delta_weight(name).reshape(module.weight.shape).t()
    return lambda x: x @ delta_t.to(x.device)


def _branch_hook(module: torch.nn.Module, branch, accumulator: _Accumulator):
    """Record E|ΔW x| per output unit and E x² per input unit for one layer."""

    def hook(_module, inputs, _output):
        x = inputs[0].detach().float()
        if isinstance(module, torch.nn.Conv2d):
            y = branch(x)
            accumulator.add(y.abs().sum(dim=(0, 2, 3)), y.shape[0] * y.shape[2] * y.shape[3],
                            x.pow(2).sum(dim=(0, 2, 3)), x.shape[0] * x.shape[2] * x.shape[3])
        else:
            flat = x.reshape(-1, x.shape[-1])
            y = branch(flat)
            accumulator.add(y.abs().sum(dim=0), flat.shape[0], flat.pow(2).sum(dim=0), flat.shape[0])

    return hook


@contextlib.contextmanager
def expert_applied(expert: SafetyExpert, module_lookup: Callable[[str], torch.nn.Module], strength: float = 1.0):
    """Temporarily add the expert's ΔW to live weights; restored bit-exactly afterwards, also on error."""
    saved = []
    try:
        for name in expert.module_names:
            module = module_lookup(name)
            weight = module.weight
            delta = strength * expert.delta_weight(name)
            if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
                raise MergeError(f"expert {expert.name!r}, module {name!r}: ΔW has shape {tuple(delta.shape)} "
                                 f"but the model's weight is {tuple(weight.shape)}; the expert is for another model")
            saved.append((weight, weight.detach().clone()))
            with torch.no_grad():
                weight.add_(delta.to(weight.dtype).to(weight.device).reshape(weight.shape))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def collect_statistics(
    run_model: Callable[[], None],
    experts: Sequence[SafetyExpert],
    module_lookup: Callable[[str], torch.nn.Module],
    info: Optional[Dict[str, object]] = None,
) -> CalibrationStatistics:
    """Run ``run_model()`` once per expert with that expert alone applied, recording layer statistics.

    Works on any module tree: ``module_lookup`` maps an expert's canonical module names to the live
    Linear/Conv2d modules. Weights are restored exactly afterwards, also when ``run_model`` fails.
    """
    names = [e.name for e in experts]
    if not experts:
        raise MergeError("no experts to calibrate")
    if len(set(names)) != len(names):
        raise MergeError(f"experts need distinct names for statistics, got {names}")
    results: Dict[str, Dict[str, ModuleStatistics]] = {}
    for expert in experts:
        accumulators: Dict[str, _Accumulator] = {}
        handles = []
        try:
            for name in expert.module_names:
                module = module_lookup(name)
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    raise MergeError(f"module {name!r} of expert {expert.name!r} is {type(module).__name__}, "
                                     "not a Linear or Conv2d layer")
                accumulators[name] = _Accumulator()
                hook = _branch_hook(module, _branch(expert, name, module), accumulators[name])
                handles.append(module.register_forward_hook(hook))
            with expert_applied(expert, module_lookup), torch.no_grad():
                run_model()
        finally:
            for handle in handles:
                handle.remove()
        empty = [n for n, a in accumulators.items() if a.row_sum is None]
        if empty:
            raise MergeError(f"calibration never reached module {empty[0]!r} of expert {expert.name!r}: "
                             "the model run does not use this layer, or the lookup maps it to the wrong module")
        results[expert.name] = {n: a.result() for n, a in accumulators.items()}
    return CalibrationStatistics(results, {e.name: expert_fingerprint(e) for e in experts}, dict(info or {}))


def diffusers_module_lookup(unet: torch.nn.Module, text_encoders: Optional[Dict[str, torch.nn.Module]] = None):
    """Map canonical names (``unet.<path>``, ``text_encoder.<path>``) to modules of diffusers models."""
    roots = {"unet": unet, **(text_encoders or {})}

    def lookup(name: str) -> torch.nn.Module:
        part, _, path = name.partition(".")
        if part not in roots:
            raise MergeError(f"no model part {part!r} for module {name!r}")
        try:
            module = roots[part].get_submodule(path)
        except AttributeError:
            raise MergeError(f"the model has no module {name!r}: the expert does not fit this model") from None
        return getattr(module, "base_layer", module)  # peft-wrapped layers

    return lookup


def calibrate_diffusers_unet(
    unet: torch.nn.Module,
    experts: Sequence[SafetyExpert],
    encoder_hidden_states_list: Sequence,
    timesteps: Sequence[int],
    latents_shape: Sequence[int],
    noise_scheduler,
    seed: int = 0,
    added_cond_kwargs_list: Optional[Sequence[Optional[Dict[str, torch.Tensor]]]] = None,
    clean_latents: Optional[torch.Tensor] = None,
) -> CalibrationStatistics:
    """Statistics from a diffusers UNet: each prompt batch at each timestep, on noisy latents.

    ``encoder_hidden_states_list``: one tensor [batch, tokens, width] per prompt batch (prompts of
    every category), or ``models.PromptEmbeddings`` (their SDXL ``added_cond`` is used). For SDXL with
    plain tensors, give ``added_cond_kwargs_list`` (``text_embeds``, ``time_ids`` per batch).
    ``latents_shape`` is one latent without the batch dimension, e.g. (4, 64, 64). Latents are
    noised pure Gaussian samples unless ``clean_latents`` (encoded images) are given. The same
    noise, timesteps and latents are used for every expert, so the contest is fair.
    """
    if not encoder_hidden_states_list or not timesteps:
        raise MergeError("calibration needs at least one prompt batch and one timestep")
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index, embedding in enumerate(encoder_hidden_states_list):
        hidden = getattr(embedding, "encoder_hidden_states", embedding)
        added = dict(getattr(embedding, "added_cond", {}) or {})
        if added_cond_kwargs_list is not None and added_cond_kwargs_list[index]:
            added = dict(added_cond_kwargs_list[index])
        count = hidden.shape[0]
        for t in timesteps:
            if clean_latents is not None:
                x0 = clean_latents[torch.randint(0, clean_latents.shape[0], (count,), generator=generator)].float()
            else:
                x0 = torch.randn((count, *latents_shape), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            t_batch = torch.full((count,), int(t), dtype=torch.long)
            noisy = noise_scheduler.add_noise(x0, noise, t_batch)
            batches.append((noisy, t_batch, hidden, added))

    def run_model():
        for noisy, t_batch, hidden, added in batches:
            kwargs = {"added_cond_kwargs": {k: v.to(device, dtype) for k, v in added.items()}} if added else {}
            unet(noisy.to(device, dtype), t_batch.to(device), encoder_hidden_states=hidden.to(device, dtype), **kwargs)

    return collect_statistics(run_model, experts, diffusers_module_lookup(unet),
                              info={"timesteps": [int(t) for t in timesteps], "batches": len(batches),
                                    "prompt_batches": len(encoder_hidden_states_list), "seed": seed})


DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
"""Calibration timesteps (of 1000): spread over the schedule, since experts act differently at each."""


def calibrate_bundle(
    bundle,
    experts: Sequence[SafetyExpert],
    prompts: Sequence[str],
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 4,
    clean_latents: Optional[torch.Tensor] = None,
) -> CalibrationStatistics:
    """Statistics for a ``models.DiffusionBundle``: encode ``prompts`` (every category), then calibrate its UNet."""
    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise MergeError("calibration needs prompts (of every category the experts cover); none were given")
    if batch_size < 1:
        raise MergeError(f"batch size must be ≥ 1, got {batch_size}")
    embeddings = [bundle.encode_prompts(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    size = int(bundle.unet.config.sample_size)
    statistics = calibrate_diffusers_unet(
        bundle.unet, experts, embeddings, timesteps, (int(bundle.unet.config.in_channels), size, size),
        bundle.noise_scheduler, seed, clean_latents=clean_latents)
    statistics.info.update({"prompts": len(prompts), "model": getattr(bundle, "name", "model")})
    return statistics
