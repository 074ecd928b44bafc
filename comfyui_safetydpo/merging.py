"""Merging safety experts into one: Co-Merge and the usual baselines, each with a weight per concept.

Every method takes per-concept weights ``w_k ≥ 0`` (``w_k = 0`` leaves expert k out) and returns a
``SafetyExpert`` that can be saved, loaded and merged again. The merge recipe (method, weights, rank,
seed, statistics hash, SVD errors) and, for Co-Merge, which expert won what share of each layer, are
recorded as JSON in ``expert.metadata["safetydpo_recipe"]`` (read it with ``merge_recipe``).

- ``merge_linear``: Σ w_k ΔW_k, exact, written as a LoRA of rank Σ r_k (rank concatenation).
- ``co_merge``: per output row (exact, rank Σ r_k) or per element (``diffs``, or truncated SVD at
  ``rank`` with the relative error reported), the winner is the expert with the largest weighted
  activation on calibration inputs (see ``calibration``).
- ``merge_svd``, ``merge_ties``, ``merge_dare``, ``merge_magnitude_prune``: baselines; TIES, DARE and
  magnitude pruning use ``peft.utils.merge_utils`` on the ΔW tensors.
- ``least_squares`` (``least_squares_merge.merge_least_squares``): per layer, the ΔW that reproduces each
  expert on its own concept's recorded inputs and the base model on safe inputs; exact, rank Σ r_k.
- ``merge_experts``: one dispatcher for nodes and the command line.

Each method is a small function per module (``_linear_module``, ``_co_merge_row`` …) built from the pure tensor
functions of ``merge_algorithms``, run over every layer by one driver, ``merge_per_module``.

Nothing is half-merged: every check runs before the first module is merged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .calibration import CalibrationStatistics, expert_fingerprint
from .merge_algorithms import (concat_factors, element_co_merge, keep_rows, relative_errors, row_winners,
                               truncated_svd, truncated_svd_of_factors, weighted_sum, win_counts)
from .errors import ArchitectureMismatchError, MergeError
from .expert import LoraModule, SafetyExpert

log = logging.getLogger(__name__)

METHODS = ("co_merge", "least_squares", "linear", "svd", "ties", "dare", "dare_ties", "magnitude_prune")
RECIPE_KEY = "safetydpo_recipe"


# -- checks ------------------------------------------------------------------------------------

def _check_weights(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]]) -> List[float]:
    if not experts:
        raise MergeError("no experts to merge: give at least one expert")
    if weights is None:
        weights = [1.0] * len(experts)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise MergeError(f"weights must be numbers, got {list(weights)!r}") from None
    if len(weights) != len(experts):
        raise MergeError(f"{len(experts)} experts but {len(weights)} weights: give one weight per expert")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise MergeError(f"experts need distinct names to be merged (the recipe and statistics use them), got {names}")
    for expert, weight in zip(experts, weights):
        if not math.isfinite(weight):
            raise MergeError(f"the weight of expert {expert.name!r} is {weight}, not a finite number")
        if weight < 0:
            raise MergeError(f"the weight of expert {expert.name!r} is {weight}; weights must be ≥ 0 "
                             "(0 leaves the expert out)")
    return weights


def _included(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]]) -> List[Tuple[SafetyExpert, float]]:
    """Validate experts and weights; the (expert, weight) pairs with w > 0."""
    weights = _check_weights(experts, weights)
    included = [(e, w) for e, w in zip(experts, weights) if w > 0]
    if not included:
        raise MergeError("every expert has weight 0: nothing would be merged; give at least one weight > 0")
    architectures = {e.architecture for e, _ in included if e.architecture != "unknown"}
    if len(architectures) > 1:
        names = ", ".join(f"{e.name} ({e.architecture})" for e, _ in included)
        raise ArchitectureMismatchError(f"experts for different architectures cannot be merged: {names}")
    shapes: Dict[str, Tuple[torch.Size, str]] = {}
    for expert, _ in included:
        if not expert.module_names:
            raise MergeError(f"expert {expert.name!r} changes no module: nothing to merge from it")
        for name in expert.module_names:
            shape = (expert.modules[name].weight_shape if name in expert.modules else expert.diffs[name].shape)
            if name in expert.modules and name in expert.diffs and expert.diffs[name].shape != shape:
                raise ArchitectureMismatchError(
                    f"expert {expert.name!r}, module {name!r}: the LoRA is for shape {tuple(shape)} but the "
                    f"diff has shape {tuple(expert.diffs[name].shape)}; the expert file is inconsistent")
            if name in shapes and shapes[name][0] != shape:
                raise ArchitectureMismatchError(
                    f"module {name!r} has shape {tuple(shape)} in expert {expert.name!r} but "
                    f"{tuple(shapes[name][0])} in expert {shapes[name][1]!r}: the experts are for different models")
            shapes.setdefault(name, (shape, expert.name))
            tensors = [expert.diffs[name]] if name in expert.diffs else []
            if name in expert.modules:
                tensors += [expert.modules[name].down, expert.modules[name].up]
            if not all(torch.isfinite(t).all() for t in tensors) or (
                    name in expert.modules and not math.isfinite(float(expert.modules[name].alpha))):
                raise MergeError(f"expert {expert.name!r} has NaN/Inf values in module {name!r}; "
                                 "retrain or re-export this expert")
    return included


def _check_rank(rank: Optional[int]) -> Optional[int]:
    if rank is None:
        return None
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise MergeError(f"rank must be a whole number ≥ 1 (or None for exact), got {rank!r}")
    return int(rank)


def _result(experts, weights, included, name: str, recipe: dict, modules=None, diffs=None,
            fingerprints: Optional[Dict[str, str]] = None) -> SafetyExpert:
    categories: List[str] = []
    for expert, _ in included:
        categories += [c for c in expert.categories if c not in categories]
    architecture = next((e.architecture for e, _ in included if e.architecture != "unknown"), "unknown")
    all_weights = _check_weights(experts, weights)
    recipe = {
        **recipe,
        "experts": [e.name for e, _ in included],
        "weights": {e.name: w for e, w in zip(experts, all_weights)},
        "expert_fingerprints": fingerprints or {e.name: expert_fingerprint(e) for e, _ in included},
    }
    return SafetyExpert(
        name=name, modules=modules or {}, diffs=diffs or {}, architecture=architecture,
        categories=categories, metadata={RECIPE_KEY: json.dumps(recipe)},
    )


def merge_recipe(expert: SafetyExpert) -> dict:
    """The recipe a merged expert was made with (empty for an expert that is not a merge)."""
    try:
        return json.loads(expert.metadata.get(RECIPE_KEY, "{}"))
    except json.JSONDecodeError:
        return {}


def co_merge_wins(expert: SafetyExpert) -> Dict[str, Dict[str, float]]:
    """Which expert won what share of each module's rows/elements, from a Co-Merge result's recipe."""
    return merge_recipe(expert).get("wins_per_module", {})


def _all_module_names(included) -> List[str]:
    return sorted({n for e, _ in included for n in e.module_names})


def _low_rank_parts(expert: SafetyExpert, name: str, weight: float):
    """(down, up) with w·ΔW = up @ down, the weight and alpha/rank folded into up (convs flattened)."""
    module = expert.modules[name]
    down = module.down.float().reshape(module.rank, -1)
    up = module.up.float().reshape(module.up.shape[0], module.rank)
    return down, up * (weight * module.scale)


def _is_low_rank(expert: SafetyExpert, name: str) -> bool:
    return name in expert.modules and name not in expert.diffs


# -- the shared per-module driver ---------------------------------------------------------------

Competitors = List[Tuple[SafetyExpert, float]]


@dataclasses.dataclass
class ModuleMerge:
    """What a method made of one module: a LoRA module and/or a full diff; for Co-Merge the win counts."""

    lora: Optional[LoraModule] = None
    diff: Optional[torch.Tensor] = None
    wins: Optional[torch.Tensor] = None  # per competitor, how many rows/elements it won


@dataclasses.dataclass
class MergedModules:
    """Everything the driver collected over the modules."""

    modules: Dict[str, LoraModule]
    diffs: Dict[str, torch.Tensor]
    wins: Dict[str, Dict[str, float]]  # module → expert → share won
    errors: Dict[str, Tuple[float, float]]  # module → (‖residual‖_F, ‖ΔW‖_F) of the SVD at ``rank``


def merge_per_module(included: Competitors, merge_module: Callable[[str, Competitors, object], ModuleMerge],
                     prepare: Optional[Callable[[str, Competitors], object]] = None,
                     rank: Optional[int] = None) -> MergedModules:
    """Run one method over every module the included experts change.

    ``prepare(module, competitors)`` runs for every module before the first merge (checks, statistics: nothing
    is half-merged); ``merge_module(module, competitors, prepared)`` merges one module from the experts that
    have it. A full diff is compressed to a rank-``rank`` LoRA by truncated SVD when ``rank`` is given.
    """
    names = _all_module_names(included)
    competitors = {m: [(e, w) for e, w in included if m in e.module_names] for m in names}
    prepared = {m: prepare(m, competitors[m]) if prepare is not None else None for m in names}
    result = MergedModules({}, {}, {}, {})
    for module_name in names:
        merged = merge_module(module_name, competitors[module_name], prepared[module_name])
        if merged.lora is not None:
            result.modules[module_name] = merged.lora
        if merged.diff is not None:
            if rank is None:
                result.diffs[module_name] = merged.diff
            else:
                result.modules[module_name], result.errors[module_name] = truncated_svd(merged.diff, rank)
        if merged.wins is not None:
            total = merged.wins.sum()
            result.wins[module_name] = {e.name: round(float(c / total), 6)
                                        for (e, _), c in zip(competitors[module_name], merged.wins)}
    return result


def _with_svd_errors(recipe: dict, errors: Dict[str, Tuple[float, float]], rank: int) -> dict:
    per_module, total = relative_errors(errors)
    log.info("%s merge at rank %d: relative Frobenius error %.4g overall, worst module %.4g",
             recipe["method"], rank, total, max(per_module.values(), default=0.0))
    return {**recipe, "svd_relative_error_per_module": per_module, "svd_relative_error": total}


# -- linear ------------------------------------------------------------------------------------

def _linear_module(module_name: str, competitors: Competitors, _=None) -> ModuleMerge:
    downs, ups, template, diff = [], [], None, None
    for expert, weight in competitors:
        if module_name in expert.modules:
            down, up = _low_rank_parts(expert, module_name, weight)
            downs.append(down)
            ups.append(up)
            template = expert.modules[module_name]
        if module_name in expert.diffs:
            diff = (0 if diff is None else diff) + weight * expert.diffs[module_name].float()
    return ModuleMerge(lora=concat_factors(downs, ups, template) if downs else None, diff=diff)


def merge_linear(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]] = None,
                 name: str = "merged_linear") -> SafetyExpert:
    """Σ_k w_k ΔW_k exactly, as a LoRA of rank Σ r_k (plus the weighted sum of any full diffs)."""
    included = _included(experts, weights)
    merged = merge_per_module(included, _linear_module)
    return _result(experts, weights, included, name, {"method": "linear", "rank": None}, merged.modules, merged.diffs)


# -- Co-Merge ----------------------------------------------------------------------------------

def _statistic(stats, expert: SafetyExpert, module_name: str, field: str, size: int) -> torch.Tensor:
    value = getattr(stats[expert.name][module_name], field).float().reshape(-1)
    if value.numel() != size:
        raise ArchitectureMismatchError(
            f"statistics for expert {expert.name!r}, module {module_name!r}: {field} has {value.numel()} "
            f"entries but the layer has {size}; the statistics were measured on another model")
    if not torch.isfinite(value).all():
        raise MergeError(f"statistics for expert {expert.name!r}, module {module_name!r} contain NaN/Inf; "
                         "recompute them")
    return value


def _co_merge_row(module_name: str, competitors: Competitors, rows) -> ModuleMerge:
    """Row Co-Merge of one module: exact LoRA of the winners' rows, or exact diff where an expert has one."""
    winner = row_winners(rows, [w for _, w in competitors])
    if all(_is_low_rank(e, module_name) for e, _ in competitors):
        downs, ups = [], []
        for index, (expert, weight) in enumerate(competitors):
            down, up = _low_rank_parts(expert, module_name, weight)
            downs.append(down)
            ups.append(keep_rows(up, winner == index))
        lora = concat_factors(downs, ups, competitors[0][0].modules[module_name])
        return ModuleMerge(lora=lora, wins=win_counts(winner, len(competitors)))
    merged = None
    for index, (expert, weight) in enumerate(competitors):
        kept = keep_rows(weight * expert.delta_weight(module_name), winner == index)
        merged = kept if merged is None else merged + kept
    return ModuleMerge(diff=merged, wins=win_counts(winner, len(competitors)))


def _co_merge_element(module_name: str, competitors: Competitors, input_sq_means) -> ModuleMerge:
    """Element Co-Merge of one module (``element_co_merge``); the expert's own diff tensor is never changed."""
    merged, winner = element_co_merge((e.delta_weight(module_name) for e, _ in competitors),
                                      [w for _, w in competitors], input_sq_means)
    return ModuleMerge(diff=merged, wins=win_counts(winner, len(competitors)))


def co_merge(
    experts: Sequence[SafetyExpert],
    weights: Optional[Sequence[float]],
    statistics: CalibrationStatistics,
    granularity: str = "row",
    rank: Optional[int] = None,
    name: str = "merged_co_merge",
) -> SafetyExpert:
    """Keep, for each output row (or element), only the expert with the largest weighted activation.

    Row mode: winner of output unit j = argmax_k w_k·E|y_k[j]|; the merged ΔW = Σ_k M_k w_k ΔW_k is
    written exactly as a LoRA of rank Σ r_k (concatenated M_k·B_k and A_k); modules where an expert
    carries full diffs are written as exact diffs. Element mode: winner per weight by
    |w_k ΔW_k[j,i]|·sqrt(E x_i²); exact ``diffs``, or a rank-``rank`` LoRA by truncated SVD with the
    relative Frobenius error per module and overall in the recipe. An expert without a module does
    not compete there.
    """
    if granularity not in ("row", "element"):
        raise MergeError(f"unknown Co-Merge granularity {granularity!r}; use 'row' or 'element'")
    if statistics is None:
        raise MergeError("Co-Merge needs calibration statistics: compute them from the model and prompts first "
                         "(calibration.collect_statistics, or trainer/merge.py statistics)")
    rank = _check_rank(rank)
    if rank is not None and granularity == "row":
        raise MergeError("row Co-Merge is exact at rank Σ r_k; a target rank applies to granularity='element' "
                         "(or use method 'svd' on the result)")
    included = _included(experts, weights)
    fingerprints = {e.name: expert_fingerprint(e) for e, _ in included}
    stats = {e.name: statistics.for_expert(e, fingerprints[e.name]) for e, _ in included}

    def activations(module_name: str, competitors: Competitors):
        """E|y_k[j]| per output row (row mode) or E x² per input feature/channel (element mode), checked."""
        template = next((e.modules[module_name] for e, _ in competitors if module_name in e.modules), None)
        shape = template.weight_shape if template is not None else competitors[0][0].diffs[module_name].shape
        rows = [_statistic(stats, e, module_name, "row_activation", shape[0]) for e, _ in competitors]
        if granularity == "row":
            return rows
        return [_statistic(stats, e, module_name, "input_sq_mean", shape[1]) for e, _ in competitors]

    merged = merge_per_module(included, _co_merge_row if granularity == "row" else _co_merge_element,
                              prepare=activations, rank=rank)
    overall = {e.name: 0.0 for e, _ in included}
    for shares in merged.wins.values():
        for expert_name, share in shares.items():
            overall[expert_name] += share / len(merged.wins)
    recipe = {"method": "co_merge", "granularity": granularity, "rank": rank,
              "statistics_hash": statistics.content_hash(),
              "wins_overall": {k: round(v, 6) for k, v in overall.items()}, "wins_per_module": merged.wins}
    if merged.errors:
        recipe = _with_svd_errors(recipe, merged.errors, rank)
    return _result(experts, weights, included, name, recipe, merged.modules, merged.diffs, fingerprints)


# -- SVD / TIES / DARE / magnitude -------------------------------------------------------------

def _full_rank_result(experts, weights, included, merged: MergedModules, rank: Optional[int], name: str,
                      recipe: dict) -> SafetyExpert:
    """A method's merged diffs as they are (``rank`` None) or as rank-``rank`` LoRAs with their SVD errors."""
    if rank is None:
        return _result(experts, weights, included, name, {**recipe, "rank": None}, diffs=merged.diffs)
    recipe = _with_svd_errors({**recipe, "rank": rank}, merged.errors, rank)
    return _result(experts, weights, included, name, recipe, modules=merged.modules)


def merge_svd(experts, weights=None, rank: int = 8, name: str = "merged_svd") -> SafetyExpert:
    """The linear merge compressed to ``rank`` by truncated SVD (relative error in the recipe)."""
    rank = _check_rank(rank)
    if rank is None:
        raise MergeError("merge_svd needs a target rank ≥ 1")
    included = _included(experts, weights)
    names = _all_module_names(included)
    if all(_is_low_rank(e, m) for m in names for e, _ in included if m in e.module_names):
        # Low-rank inputs: SVD of the rank-concatenated factors, exact and far cheaper than of ΔW.
        linear = merge_linear(experts, weights)
        modules, errors = {}, {}
        for m in names:
            lora = linear.modules[m]
            down, up = _low_rank_parts(linear, m, 1.0)
            modules[m], errors[m] = truncated_svd_of_factors(up, down, rank, lora)
        recipe = _with_svd_errors({"method": "svd", "rank": rank}, errors, rank)
        return _result(experts, weights, included, name, recipe, modules=modules)

    def summed(module_name: str, competitors: Competitors, _=None) -> ModuleMerge:
        return ModuleMerge(diff=weighted_sum([e.delta_weight(module_name) for e, _ in competitors],
                                             [w for _, w in competitors]))

    merged = merge_per_module(included, summed, rank=rank)
    return _full_rank_result(experts, weights, included, merged, rank, name, {"method": "svd"})


def _peft_merge(method: str, experts, weights, density: float, rank: Optional[int], seed: Optional[int],
                name: str, majority_sign_method: str = "total") -> SafetyExpert:
    """TIES, DARE, DARE-TIES and magnitude pruning: ``peft.utils.merge_utils``' tensor functions per module."""
    from peft.utils import merge_utils

    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    rank = _check_rank(rank)
    included = _included(experts, weights)
    algorithm = {
        "ties": lambda deltas, ws: merge_utils.ties(deltas, ws, density, majority_sign_method),
        "dare": lambda deltas, ws: merge_utils.dare_linear(deltas, ws, density),
        "dare_ties": lambda deltas, ws: merge_utils.dare_ties(deltas, ws, density, majority_sign_method),
        "magnitude_prune": lambda deltas, ws: merge_utils.magnitude_prune(deltas, ws, density),
    }[method]

    def peft_module(module_name: str, competitors: Competitors, _=None) -> ModuleMerge:
        deltas = [e.delta_weight(module_name) for e, _ in competitors]
        return ModuleMerge(diff=algorithm(deltas, torch.tensor([w for _, w in competitors], dtype=torch.float32)))

    with torch.random.fork_rng(devices=[]):  # DARE's random drops: reproducible, global RNG untouched
        torch.manual_seed(0 if seed is None else int(seed))
        merged = merge_per_module(included, peft_module, rank=rank)
    recipe = {"method": method, "density": density}
    if method.startswith("dare"):
        recipe["seed"] = 0 if seed is None else int(seed)
    if method.endswith("ties"):
        recipe["majority_sign_method"] = majority_sign_method
    return _full_rank_result(experts, weights, included, merged, rank, name, recipe)


def merge_ties(experts, weights=None, density: float = 0.5, rank: Optional[int] = None,
               majority_sign_method: str = "total", name: str = "merged_ties") -> SafetyExpert:
    """TIES (trim to ``density``, elect sign, disjoint merge) through peft; diffs, or SVD at ``rank``."""
    return _peft_merge("ties", experts, weights, density, rank, None, name, majority_sign_method)


def merge_dare(experts, weights=None, density: float = 0.5, rank: Optional[int] = None, seed: int = 0,
               ties: bool = False, name: str = "merged_dare") -> SafetyExpert:
    """DARE (random drop to ``density`` and rescale, then linear or TIES) through peft, seeded."""
    return _peft_merge("dare_ties" if ties else "dare", experts, weights, density, rank, seed, name)


def merge_magnitude_prune(experts, weights=None, density: float = 0.5, rank: Optional[int] = None,
                          name: str = "merged_magnitude_prune") -> SafetyExpert:
    """Keep the largest-magnitude fraction ``density`` of each ΔW, then the weighted sum (peft)."""
    return _peft_merge("magnitude_prune", experts, weights, density, rank, None, name)


_OPTIONS = {
    "co_merge": {"granularity"},
    "least_squares": {"preserve_weight", "ridge"},
    "linear": set(),
    "svd": set(),
    "ties": {"density", "majority_sign_method"},
    "dare": {"density", "seed"},
    "dare_ties": {"density", "seed", "majority_sign_method"},
    "magnitude_prune": {"density"},
}


STATISTICS_FOR_METHOD = {"co_merge": "Co-Merge calibration statistics (Compute Co-Merge Statistics, or "
                                     "`trainer/merge.py statistics`)",
                         "least_squares": "least-squares layer-input statistics (Record Least-Squares Statistics, "
                                          "or `trainer/merge.py statistics --method least_squares`)"}


def _check_statistics_kind(method: str, statistics) -> None:
    """A clear MergeError when the statistics object was made for the other statistics-based method."""
    from .least_squares_merge import LayerInputStatistics

    expected = {"co_merge": CalibrationStatistics, "least_squares": LayerInputStatistics}.get(method)
    if statistics is None or expected is None or isinstance(statistics, expected):
        return
    other = next((m for m, kind in (("co_merge", CalibrationStatistics), ("least_squares", LayerInputStatistics))
                  if isinstance(statistics, kind)), None)
    got = f"statistics for method {other!r}" if other else f"a {type(statistics).__name__}"
    raise MergeError(f"method {method!r} needs {STATISTICS_FOR_METHOD[method]}, but was given {got}; "
                     f"record the statistics for {method!r} or choose method {other or 'linear'!r}")


def merge_experts(experts: Sequence[SafetyExpert], weights: Optional[Sequence[float]] = None,
                  method: str = "co_merge", statistics=None,
                  rank: Optional[int] = None, name: Optional[str] = None, **options) -> SafetyExpert:
    """One entry point for nodes and the command line: ``method`` is one of ``METHODS``.

    ``rank``: target rank for element Co-Merge and the SVD/TIES/DARE/magnitude results (None = exact
    diffs; ``svd`` defaults to 8); ignored by ``linear`` and row Co-Merge, which are exact low rank.
    ``options``: ``granularity`` (co_merge), ``preserve_weight`` and ``ridge`` (least_squares), ``density``,
    ``seed``, ``majority_sign_method``. ``statistics``: ``calibration.CalibrationStatistics`` for co_merge,
    ``least_squares_merge.LayerInputStatistics`` for least_squares (the wrong kind is a MergeError).
    """
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(k for k, v in options.items() if k not in _OPTIONS[method] and v is not None)
    if unknown:
        raise MergeError(f"option(s) {unknown} do not apply to method {method!r}; "
                         f"it takes {sorted(_OPTIONS[method]) or 'no options'}")
    options = {k: v for k, v in options.items() if v is not None}
    name = name or f"merged_{method}"
    _check_statistics_kind(method, statistics)
    if method == "least_squares":
        from .least_squares_merge import DEFAULT_PRESERVE_WEIGHT, DEFAULT_RIDGE, merge_least_squares

        return merge_least_squares(experts, weights, statistics,
                                   float(options.get("preserve_weight", DEFAULT_PRESERVE_WEIGHT)),
                                   float(options.get("ridge", DEFAULT_RIDGE)), name)
    if method == "co_merge":
        granularity = options.get("granularity", "row")
        return co_merge(experts, weights, statistics, granularity, rank if granularity == "element" else None, name)
    if method == "linear":
        return merge_linear(experts, weights, name)
    if method == "svd":
        return merge_svd(experts, weights, 8 if rank is None else rank, name)
    if method == "ties":
        return merge_ties(experts, weights, options.get("density", 0.5), rank,
                          options.get("majority_sign_method", "total"), name)
    if method in ("dare", "dare_ties"):
        if method == "dare_ties":
            return _peft_merge("dare_ties", experts, weights, options.get("density", 0.5), rank,
                               options.get("seed", 0), name, options.get("majority_sign_method", "total"))
        return merge_dare(experts, weights, options.get("density", 0.5), rank, options.get("seed", 0), name=name)
    return merge_magnitude_prune(experts, weights, options.get("density", 0.5), rank, name)
