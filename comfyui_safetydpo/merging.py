"""Merging safety experts into one: Co-Merge and the usual baselines, each with a weight per concept.

Every method takes per-concept weights ``w_k ≥ 0`` (``w_k = 0`` leaves expert k out) and returns a
``SafetyExpert`` that can be saved, loaded and merged again. The merge recipe and, for Co-Merge,
which expert won what share of each layer, are recorded in ``expert.metadata``.

- ``merge_linear``: Σ w_k ΔW_k, exact, written as a LoRA of rank Σ r_k (rank concatenation).
- ``co_merge``: per output row (exact, rank Σ r_k) or per element (``diffs``, or truncated SVD at
  ``rank`` with the relative error reported), the winner is the expert with the largest weighted
  activation on calibration inputs (see ``calibration``).
- ``merge_svd``, ``merge_ties``, ``merge_dare``, ``merge_magnitude_prune``: baselines; TIES, DARE and
  magnitude pruning use ``peft.utils.merge_utils`` on the ΔW tensors.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .calibration import CalibrationStatistics, expert_fingerprint
from .errors import ArchitectureMismatchError, MergeError
from .expert import LoraModule, SafetyExpert

METHODS = ("co_merge", "linear", "svd", "ties", "dare", "magnitude_prune")


# -- checks ------------------------------------------------------------------------------------

def _included(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]]) -> List[Tuple[SafetyExpert, float]]:
    """Validate experts and weights; the (expert, weight) pairs with w > 0."""
    if not experts:
        raise MergeError("no experts to merge: give at least one expert")
    if weights is None:
        weights = [1.0] * len(experts)
    weights = [float(w) for w in weights]
    if len(weights) != len(experts):
        raise MergeError(f"{len(experts)} experts but {len(weights)} weights: give one weight per expert")
    for expert, weight in zip(experts, weights):
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise MergeError(f"the weight of expert {expert.name!r} is not a finite number")
        if weight < 0:
            raise MergeError(f"the weight of expert {expert.name!r} is {weight}; weights must be ≥ 0 "
                             "(0 leaves the expert out)")
    included = [(e, w) for e, w in zip(experts, weights) if w > 0]
    if not included:
        raise MergeError("every expert has weight 0: nothing would be merged; give at least one weight > 0")
    architectures = {e.architecture for e, _ in included if e.architecture != "unknown"}
    if len(architectures) > 1:
        names = ", ".join(f"{e.name} ({e.architecture})" for e, _ in included)
        raise ArchitectureMismatchError(f"experts for different architectures cannot be merged: {names}")
    shapes: Dict[str, Tuple[torch.Size, str]] = {}
    for expert, _ in included:
        for name in expert.module_names:
            shape = (expert.modules[name].weight_shape if name in expert.modules else expert.diffs[name].shape)
            if name in shapes and shapes[name][0] != shape:
                raise ArchitectureMismatchError(
                    f"module {name!r} has shape {tuple(shape)} in expert {expert.name!r} but "
                    f"{tuple(shapes[name][0])} in expert {shapes[name][1]!r}: the experts are for different models")
            shapes.setdefault(name, (shape, expert.name))
            tensors = [expert.diffs[name]] if name in expert.diffs else []
            if name in expert.modules:
                tensors += [expert.modules[name].down, expert.modules[name].up]
            if not all(torch.isfinite(t).all() for t in tensors):
                raise MergeError(f"expert {expert.name!r} has NaN/Inf values in module {name!r}")
    return included


def _result(included, name: str, recipe: dict, modules=None, diffs=None) -> SafetyExpert:
    categories: List[str] = []
    for expert, _ in included:
        categories += [c for c in expert.categories if c not in categories]
    architecture = next((e.architecture for e, _ in included if e.architecture != "unknown"), "unknown")
    recipe = {**recipe, "experts": [e.name for e, _ in included], "weights": {e.name: w for e, w in included}}
    return SafetyExpert(
        name=name, modules=modules or {}, diffs=diffs or {}, architecture=architecture,
        categories=categories, metadata={"safetydpo_recipe": json.dumps(recipe)},
    )


def _all_module_names(included) -> List[str]:
    return sorted({n for e, _ in included for n in e.module_names})


def _low_rank_parts(expert: SafetyExpert, name: str, weight: float):
    """(down, up) with ΔW = up @ down · weight folded into up (flattened for convolutions)."""
    module = expert.modules[name]
    down = module.down.float().reshape(module.rank, -1)
    up = module.up.float().reshape(module.up.shape[0], module.rank)
    return down, up * (weight * module.scale)


def _as_lora(name: str, downs, ups, template: Optional[LoraModule]) -> LoraModule:
    """Concatenated factors as one module with alpha = rank (scale 1), in the original conv shape."""
    down = torch.cat(downs, dim=0)
    up = torch.cat(ups, dim=1)
    rank = down.shape[0]
    if template is not None and template.down.dim() == 4:
        down = down.reshape(rank, *template.down.shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LoraModule(down=down, up=up, alpha=float(rank))


def _full_delta(expert: SafetyExpert, name: str) -> torch.Tensor:
    return expert.delta_weight(name)


# -- linear ------------------------------------------------------------------------------------

def merge_linear(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]] = None,
                 name: str = "merged_linear") -> SafetyExpert:
    """Σ_k w_k ΔW_k exactly, as a LoRA of rank Σ r_k (plus summed diffs)."""
    included = _included(experts, weights)
    modules, diffs = {}, {}
    for module_name in _all_module_names(included):
        downs, ups, template = [], [], None
        for expert, weight in included:
            if module_name in expert.modules:
                down, up = _low_rank_parts(expert, module_name, weight)
                downs.append(down)
                ups.append(up)
                template = expert.modules[module_name]
            if module_name in expert.diffs:
                diffs[module_name] = diffs.get(module_name, 0) + weight * expert.diffs[module_name].float()
        if downs:
            modules[module_name] = _as_lora(module_name, downs, ups, template)
    return _result(included, name, {"method": "linear"}, modules, diffs)


# -- Co-Merge ----------------------------------------------------------------------------------

def co_merge(
    experts: Sequence[SafetyExpert],
    weights: Optional[Sequence[float]],
    statistics: CalibrationStatistics,
    granularity: str = "row",
    rank: Optional[int] = None,
    name: str = "merged_co_merge",
) -> SafetyExpert:
    """Keep, for each output row (or element), only the expert with the largest weighted activation."""
    if granularity not in ("row", "element"):
        raise MergeError(f"unknown Co-Merge granularity {granularity!r}; use 'row' or 'element'")
    if statistics is None:
        raise MergeError("Co-Merge needs calibration statistics: compute them from the model and prompts first")
    included = _included(experts, weights)
    stats = {e.name: statistics.for_expert(e) for e, _ in included}
    modules, diffs, wins, errors = {}, {}, {}, {}
    for module_name in _all_module_names(included):
        competitors = [(e, w) for e, w in included if module_name in e.module_names]
        if granularity == "row":
            if any(module_name not in e.modules or module_name in e.diffs for e, _ in competitors):
                raise MergeError(f"row Co-Merge needs LoRA modules; {module_name!r} has full diffs: "
                                 "use granularity='element'")
            scores = torch.stack([w * stats[e.name][module_name].row_activation.float() for e, w in competitors])
            winner = scores.argmax(dim=0)
            downs, ups = [], []
            for index, (expert, weight) in enumerate(competitors):
                down, up = _low_rank_parts(expert, module_name, weight)
                mask = (winner == index).to(up.dtype).unsqueeze(1)
                downs.append(down)
                ups.append(up * mask)
            modules[module_name] = _as_lora(module_name, downs, ups, competitors[0][0].modules[module_name])
        else:
            deltas = torch.stack([w * _full_delta(e, module_name) for e, w in competitors])
            shape = deltas.shape[1:]
            flat = deltas.reshape(len(competitors), shape[0], -1)
            scores = []
            for (expert, weight), delta in zip(competitors, flat):
                input_scale = stats[expert.name][module_name].input_sq_mean.float().sqrt()
                if delta.shape[1] != input_scale.shape[0]:  # conv: repeat per kernel position
                    input_scale = input_scale.repeat_interleave(delta.shape[1] // input_scale.shape[0])
                scores.append(delta.abs() * input_scale.unsqueeze(0))
            winner = torch.stack(scores).argmax(dim=0)
            merged = torch.gather(flat, 0, winner.unsqueeze(0)).squeeze(0).reshape(shape)
            if rank is None:
                diffs[module_name] = merged
            else:
                modules[module_name], errors[module_name] = _truncated_svd(merged, rank)
        counts = torch.bincount(winner.reshape(-1), minlength=len(competitors)).float()
        wins[module_name] = {e.name: round(float(c / counts.sum()), 6) for (e, _), c in zip(competitors, counts)}
    overall = {e.name: 0.0 for e, _ in included}
    for shares in wins.values():
        for expert_name, share in shares.items():
            overall[expert_name] += share / len(wins)
    recipe = {"method": "co_merge", "granularity": granularity, "rank": rank,
              "statistics_fingerprints": {e.name: expert_fingerprint(e) for e, _ in included},
              "wins_overall": overall, "wins_per_module": wins}
    if errors:
        recipe["svd_relative_error_per_module"] = errors
        recipe["svd_relative_error"] = _overall_error(errors, modules, diffs)
    return _result(included, name, recipe, modules, diffs)


def co_merge_wins(expert: SafetyExpert) -> Dict[str, Dict[str, float]]:
    """Which expert won what share of each module, from a Co-Merge result's recipe."""
    recipe = json.loads(expert.metadata.get("safetydpo_recipe", "{}"))
    return recipe.get("wins_per_module", {})


# -- SVD / TIES / DARE / magnitude -------------------------------------------------------------

def _truncated_svd(delta: torch.Tensor, rank: int) -> Tuple[LoraModule, float]:
    """Best rank-``rank`` approximation of ΔW as a LoRA module, and its relative Frobenius error."""
    if rank < 1:
        raise MergeError(f"rank must be ≥ 1, got {rank}")
    shape = delta.shape
    matrix = delta.reshape(shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root.unsqueeze(1) * vh[:r]
    approx = up @ down
    norm = matrix.norm()
    error = float((matrix - approx).norm() / norm) if norm > 0 else 0.0
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(r)), error


def _overall_error(errors: Dict[str, float], modules, diffs) -> float:
    return float(sum(errors.values()) / max(len(errors), 1))


def _finish_full_rank(included, merged: Dict[str, torch.Tensor], rank: Optional[int], name: str, recipe: dict):
    if rank is None:
        return _result(included, name, recipe, diffs=merged)
    modules, errors = {}, {}
    for module_name, delta in merged.items():
        modules[module_name], errors[module_name] = _truncated_svd(delta, rank)
    recipe = {**recipe, "rank": rank, "svd_relative_error_per_module": errors,
              "svd_relative_error": _overall_error(errors, modules, {})}
    return _result(included, name, recipe, modules=modules)


def merge_svd(experts, weights=None, rank: int = 8, name: str = "merged_svd") -> SafetyExpert:
    """The linear merge compressed to ``rank`` by truncated SVD (error reported in the recipe)."""
    included = _included(experts, weights)
    merged = {m: sum(w * _full_delta(e, m) for e, w in included if m in e.module_names)
              for m in _all_module_names(included)}
    return _finish_full_rank(included, merged, rank, name, {"method": "svd"})


def _peft_merge(method: str, experts, weights, density: float, rank: Optional[int], seed: int, name: str,
                majority_sign_method: str = "total"):
    from peft.utils import merge_utils

    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    included = _included(experts, weights)
    merged = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name in _all_module_names(included):
            competitors = [(e, w) for e, w in included if module_name in e.module_names]
            deltas = [_full_delta(e, module_name) for e, _ in competitors]
            ws = torch.tensor([w for _, w in competitors], dtype=torch.float32)
            if method == "ties":
                merged[module_name] = merge_utils.ties(deltas, ws, density, majority_sign_method)
            elif method == "dare":
                merged[module_name] = merge_utils.dare_linear(deltas, ws, density)
            elif method == "dare_ties":
                merged[module_name] = merge_utils.dare_ties(deltas, ws, density, majority_sign_method)
            else:
                merged[module_name] = merge_utils.magnitude_prune(deltas, ws, density)
    recipe = {"method": method, "density": density, "seed": seed}
    return _finish_full_rank(included, merged, rank, name, recipe)


def merge_ties(experts, weights=None, density: float = 0.5, rank: Optional[int] = None,
               name: str = "merged_ties") -> SafetyExpert:
    """TIES (trim, elect sign, disjoint merge) through peft."""
    return _peft_merge("ties", experts, weights, density, rank, 0, name)


def merge_dare(experts, weights=None, density: float = 0.5, rank: Optional[int] = None, seed: int = 0,
               name: str = "merged_dare") -> SafetyExpert:
    """DARE (random drop and rescale, then linear) through peft, reproducible with ``seed``."""
    return _peft_merge("dare", experts, weights, density, rank, seed, name)


def merge_magnitude_prune(experts, weights=None, density: float = 0.5, rank: Optional[int] = None,
                          name: str = "merged_magnitude_prune") -> SafetyExpert:
    """Keep the largest-magnitude fraction ``density`` of each ΔW, then the weighted sum (peft)."""
    return _peft_merge("magnitude_prune", experts, weights, density, rank, 0, name)


def merge_experts(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]] = None,
                  method: str = "co_merge", statistics: Optional[CalibrationStatistics] = None,
                  rank: Optional[int] = None, name: Optional[str] = None, **options) -> SafetyExpert:
    """One entry point for nodes and the command line."""
    name = name or f"merged_{method}"
    if method == "co_merge":
        return co_merge(experts, weights, statistics, options.get("granularity", "row"), rank, name)
    if method == "linear":
        return merge_linear(experts, weights, name)
    if method == "svd":
        return merge_svd(experts, weights, rank or 8, name)
    if method == "ties":
        return merge_ties(experts, weights, options.get("density", 0.5), rank, name)
    if method == "dare":
        return merge_dare(experts, weights, options.get("density", 0.5), rank, options.get("seed", 0), name)
    if method == "magnitude_prune":
        return merge_magnitude_prune(experts, weights, options.get("density", 0.5), rank, name)
    raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
