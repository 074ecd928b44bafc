"""Least-squares merge: one LoRA that acts like each expert on its own concept and like the base model elsewhere.

Co-Merge picks a winner per weight; on the demo world each expert alone changed almost nothing outside its
concept, yet every winner-take-all or summed merge of seven experts changed about half of the safe-prompt
images. This merge asks the question directly, per layer, from recorded layer inputs (as RegMean merges
models and UCE/MACE keep a preserve set fixed):

    minimise over ΔW   Σ_k E_{x ~ concept k} ‖ΔW x − w_k ΔW_k x‖²  +  λ · E_{x ~ safe} ‖ΔW x‖²  +  ε ‖ΔW‖²

where "concept k" are the layer's inputs while the model (with expert k applied) draws expert k's prompts,
and "safe" are its inputs while the base model draws safe prompts. The solution is

    ΔW = (Σ_k w_k ΔW_k G_k) (Σ_k G_k + λ G_safe + ε I)⁻¹,     G = E[x xᵀ]

and for LoRA experts (ΔW_k = s_k B_k A_k) it is exactly a LoRA of rank Σ r_k: up = [w_k s_k B_k],
down = [A_k G_k M⁻¹]. A weight w_k = 0 keeps concept k's own inputs in the system with target 0: the merge
then leaves that concept as the base model draws it (per-concept weights act per concept).

Statistics (``LayerInputStatistics``) keep, per layer, Σ_k G_k, G_safe and the projections A_k G_k, so a
re-merge with other weights or λ needs no model pass; they are tied to the experts by fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

from .calibration import expert_applied, expert_fingerprint
from . import files
from .errors import MergeError
from .expert import SafetyExpert

STATISTICS_KIND = "least_squares_statistics"
DEFAULT_PRESERVE_WEIGHT = 1.0
"""λ: how much the base model's behaviour on safe inputs counts against each concept's own inputs."""
DEFAULT_RIDGE = 1e-3
"""ε relative to the mean diagonal of the system: keeps directions no input ever took unchanged (ΔW·v = 0)."""


class _GramAccumulator:
    """Running Σ x xᵀ and count of a layer's input vectors (float64 for exact sums over many tokens)."""

    def __init__(self):
        self.gram: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, flat: torch.Tensor) -> None:
        flat = flat.detach().to(torch.float64)
        product = flat.t() @ flat
        self.gram = product if self.gram is None else self.gram + product
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.gram / max(self.count, 1)).float()


@contextlib.contextmanager
def _recording(module_lookup: Callable[[str], torch.nn.Module],
               names: Sequence[str]) -> Iterator[Dict[str, _GramAccumulator]]:
    """Hooks that accumulate the input Gram matrix of each named Linear layer while the block runs."""
    accumulators = {name: _GramAccumulator() for name in names}
    handles = []
    try:
        for name in names:
            module = module_lookup(name)
            if not isinstance(module, torch.nn.Linear):
                raise MergeError(f"least-squares merge records Linear layers only; module {name!r} is "
                                 f"{type(module).__name__} (use Co-Merge or linear for convolution experts)")

            def hook(_module, inputs, _output, accumulator=accumulators[name]):
                x = inputs[0]
                accumulator.add(x.reshape(-1, x.shape[-1]))

            handles.append(module.register_forward_hook(hook))
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class LayerInputStatistics:
    """Per module: Σ_k G_k over the experts' concepts, G_safe, and each expert's projection A_k G_k (or ΔW_k G_k)."""

    concept_gram: Dict[str, torch.Tensor]
    safe_gram: Dict[str, torch.Tensor]
    projections: Dict[str, Dict[str, torch.Tensor]]  # expert name -> module -> [rank, in] (or [out, in] for diffs)
    fingerprints: Dict[str, str]
    info: Dict[str, object] = dataclasses.field(default_factory=dict)

    def check_experts(self, experts: Sequence[SafetyExpert]) -> None:
        """Raise MergeError unless these statistics were recorded with exactly these experts' weights."""
        for expert in experts:
            if expert.name not in self.projections:
                raise MergeError(f"the least-squares statistics have no entry for expert {expert.name!r} (they cover "
                                 f"{sorted(self.projections)}); record statistics with this expert first")
            if self.fingerprints.get(expert.name) != expert_fingerprint(expert):
                raise MergeError(f"the least-squares statistics for {expert.name!r} were recorded with other weights; "
                                 "record them again")
            missing = sorted(set(expert.module_names) - set(self.projections[expert.name]))
            if missing:
                raise MergeError(f"least-squares statistics for {expert.name!r} lack module {missing[0]!r}; "
                                 "record them again")

    def save(self, path) -> Path:
        """Atomic safetensors file (tensors + expert names and fingerprints in metadata)."""
        tensors = {}
        names = sorted(self.projections)
        for module, gram in self.concept_gram.items():
            tensors[f"concept_gram/{module}"] = gram.contiguous()
            tensors[f"safe_gram/{module}"] = self.safe_gram[module].contiguous()
        for index, name in enumerate(names):
            for module, projection in self.projections[name].items():
                tensors[f"projection/{index}/{module}"] = projection.contiguous()
        metadata = {"safetydpo_kind": STATISTICS_KIND, "experts": json.dumps(names),
                    "fingerprints": json.dumps(self.fingerprints), "info": json.dumps(self.info, default=str)}
        return files.save_safetensors(path, tensors, metadata, error=MergeError, what="statistics")

    @staticmethod
    def load(path) -> "LayerInputStatistics":
        from .files import read_safetensors

        tensors, metadata = read_safetensors(path)
        if metadata.get("safetydpo_kind") != STATISTICS_KIND:
            raise MergeError(f"{path}: not a least-squares statistics file (record one with "
                             "`python trainer/merge.py statistics --method least_squares ...`)")
        try:
            names = json.loads(metadata["experts"])
            concept, safe, projections = {}, {}, {name: {} for name in names}
            for key, tensor in tensors.items():
                kind, rest = key.split("/", 1)
                if kind == "concept_gram":
                    concept[rest] = tensor
                elif kind == "safe_gram":
                    safe[rest] = tensor
                elif kind == "projection":
                    index, module = rest.split("/", 1)
                    projections[names[int(index)]][module] = tensor
                else:
                    raise KeyError(key)
            if set(concept) != set(safe):
                raise KeyError("safe_gram")
            return LayerInputStatistics(concept, safe, projections, json.loads(metadata["fingerprints"]),
                                        json.loads(metadata.get("info", "{}")))
        except (KeyError, ValueError, IndexError, json.JSONDecodeError) as error:
            raise MergeError(f"{path}: the least-squares statistics file is damaged (bad or missing entry {error}); "
                             "record it again") from None


def _projection(expert: SafetyExpert, module_name: str, gram: torch.Tensor) -> torch.Tensor:
    """A_k G_k for a LoRA module (ΔW_k = s B A), or ΔW_k G_k for a full diff."""
    if module_name in expert.modules and module_name not in expert.diffs:
        return expert.modules[module_name].down.float().reshape(expert.modules[module_name].rank, -1) @ gram
    return expert.delta_weight(module_name).float().reshape(-1, gram.shape[0]) @ gram


def record_statistics(
    experts: Sequence[SafetyExpert],
    module_lookup: Callable[[str], torch.nn.Module],
    run_concept: Callable[[SafetyExpert], None],
    run_safe: Callable[[], None],
    info: Optional[Dict[str, object]] = None,
) -> LayerInputStatistics:
    """Record layer inputs: ``run_concept(expert)`` with that expert applied, ``run_safe()`` on the base model.

    ``run_concept(expert)`` should draw the expert's own concept's prompts (its unsafe prompts) and
    ``run_safe()`` prompts that must not change; both run the real sampler or denoiser passes. Weights
    are restored exactly afterwards, also on error.
    """
    if not experts:
        raise MergeError("no experts to record statistics for")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise MergeError(f"experts need distinct names for statistics, got {names}")
    modules = sorted({m for e in experts for m in e.module_names})
    concept_gram: Dict[str, torch.Tensor] = {}
    projections: Dict[str, Dict[str, torch.Tensor]] = {}
    for expert in experts:
        with _recording(module_lookup, modules) as accumulators:
            with expert_applied(expert, module_lookup), torch.no_grad():
                run_concept(expert)
        empty = [n for n, a in accumulators.items() if a.gram is None]
        if empty:
            raise MergeError(f"recording for expert {expert.name!r} never reached module {empty[0]!r}: the model run "
                             "does not use this layer, or the lookup maps it to the wrong module")
        grams = {n: a.mean() for n, a in accumulators.items()}
        for module, gram in grams.items():
            concept_gram[module] = concept_gram.get(module, 0) + gram
        projections[expert.name] = {m: _projection(expert, m, grams[m]) for m in expert.module_names}
    with _recording(module_lookup, modules) as accumulators, torch.no_grad():
        run_safe()
    empty = [n for n, a in accumulators.items() if a.gram is None]
    if empty:
        raise MergeError(f"the safe-prompt run never reached module {empty[0]!r}")
    safe_gram = {n: a.mean() for n, a in accumulators.items()}
    return LayerInputStatistics(concept_gram, safe_gram, projections,
                                {e.name: expert_fingerprint(e) for e in experts}, dict(info or {}))


def solve_layer(concept_gram: torch.Tensor, safe_gram: torch.Tensor, preserve_weight: float,
                ridge: float) -> torch.Tensor:
    """M⁻¹ for M = Σ_k G_k + λ G_safe + ε·mean(diag)·I (symmetric positive definite)."""
    system = concept_gram.double() + preserve_weight * safe_gram.double()
    scale = float(system.diagonal().mean()) if system.numel() else 1.0
    system = system + ridge * max(scale, 1e-12) * torch.eye(system.shape[0], dtype=system.dtype)
    return torch.linalg.inv(system)


def merge_least_squares(
    experts: Sequence[SafetyExpert],
    weights: Optional[Sequence[float]],
    statistics: LayerInputStatistics,
    preserve_weight: float = DEFAULT_PRESERVE_WEIGHT,
    ridge: float = DEFAULT_RIDGE,
    name: str = "merged_least_squares",
) -> SafetyExpert:
    """The per-layer least-squares merge (module docstring); exact LoRA of rank Σ r_k for LoRA experts."""
    from .merge_algorithms import concat_factors, least_squares_down
    from .merging import ModuleMerge, _included, _low_rank_parts, _result, merge_per_module

    if statistics is None:
        raise MergeError("the least-squares merge needs layer statistics: record them from the model, the experts' "
                         "prompts and safe prompts first (least_squares_merge.record_statistics, or "
                         "trainer/merge.py statistics --method least_squares)")
    if not (math.isfinite(preserve_weight) and preserve_weight >= 0):
        raise MergeError(f"preserve weight λ must be a finite number ≥ 0, got {preserve_weight}")
    if not (math.isfinite(ridge) and ridge > 0):
        raise MergeError(f"ridge must be a finite number > 0, got {ridge}")
    included = _included(experts, weights)
    statistics.check_experts([e for e, _ in included])

    def check(module_name: str, competitors) -> None:
        if module_name not in statistics.concept_gram:
            raise MergeError(f"the least-squares statistics have no Gram matrix for module {module_name!r}")

    def merge_module(module_name: str, competitors, _=None) -> ModuleMerge:
        inverse = solve_layer(statistics.concept_gram[module_name], statistics.safe_gram[module_name],
                              preserve_weight, ridge).float()
        projections = [statistics.projections[e.name][module_name].float() for e, _ in competitors]
        if all(module_name in e.modules and module_name not in e.diffs for e, _ in competitors):
            ups = [_low_rank_parts(e, module_name, w)[1] for e, w in competitors]
            downs = [least_squares_down(projection, inverse) for projection in projections]
            return ModuleMerge(lora=concat_factors(downs, ups, competitors[0][0].modules[module_name]))
        merged = 0
        for (expert, weight), projection in zip(competitors, projections):
            if module_name in expert.modules and module_name not in expert.diffs:
                _, up = _low_rank_parts(expert, module_name, weight)
                merged = merged + up @ projection @ inverse  # (w s B_k)(A_k G_k) M⁻¹
            else:
                merged = merged + weight * projection @ inverse  # (w ΔW_k G_k) M⁻¹
        return ModuleMerge(diff=merged.reshape(competitors[0][0].delta_weight(module_name).shape))

    merged = merge_per_module(included, merge_module, prepare=check)
    recipe = {"method": "least_squares", "preserve_weight": preserve_weight, "ridge": ridge, "rank": None,
              "statistics_info": statistics.info}
    return _result(experts, weights, included, name, recipe, merged.modules, merged.diffs)


def fit_report(experts: Sequence[SafetyExpert], weights: Sequence[float], merged: SafetyExpert,
               statistics: LayerInputStatistics) -> Dict[str, float]:
    """Relative squared errors of the merged ΔW on safe inputs (vs 0) and on concept inputs (vs Σ w_k ΔW_k G_k).

    ``safe_change``: E‖ΔW x‖² / E‖Σ_k w_k ΔW_k x‖² over safe inputs (how much of the summed experts'
    change on safe inputs is left); summed over modules.
    """
    linear_safe = merged_safe = 0.0
    for module_name in merged.module_names:
        gram = statistics.safe_gram[module_name].double()
        delta = merged.delta_weight(module_name).double().reshape(-1, gram.shape[0])
        summed = sum(w * e.delta_weight(module_name).double().reshape(-1, gram.shape[0])
                     for e, w in zip(experts, weights) if w > 0 and module_name in e.module_names)
        merged_safe += float(torch.trace(delta @ gram @ delta.t()))
        linear_safe += float(torch.trace(summed @ gram @ summed.t()))
    return {"safe_change_vs_linear": merged_safe / linear_safe if linear_safe > 0 else 0.0}
