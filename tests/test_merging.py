"""Merging: linear is exact, Co-Merge keeps the most active expert's rows, baselines run through peft."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_safetydpo import lora_files, merging
from comfyui_safetydpo.calibration import CalibrationStatistics, ModuleStatistics, expert_fingerprint
from comfyui_safetydpo.errors import ArchitectureMismatchError, MergeError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

MODULES = {"unet.a.to_q": (12, 10), "unet.b.to_k": (16, 10), "unet.c.conv": (6, 4)}


def make_expert(name, seed, scale=1.0, rank=3, alpha=6.0, modules=MODULES):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in modules.items():
        if m.endswith("conv"):
            out[m] = LoraModule(torch.randn(rank, i, 3, 3, generator=g), scale * torch.randn(o, rank, 1, 1, generator=g), alpha)
        else:
            out[m] = LoraModule(torch.randn(rank, i, generator=g), scale * torch.randn(o, rank, generator=g), alpha)
    return SafetyExpert(name, out, architecture="sd15", categories=[name.capitalize()])


def make_statistics(experts, activations):
    """activations[expert][module] = row activation tensor; input scale 1."""
    stats = {}
    for e in experts:
        stats[e.name] = {}
        for m in e.module_names:
            shape = e.modules[m].weight_shape
            stats[e.name][m] = ModuleStatistics(activations[e.name][m], torch.ones(shape[1]), 10)
    return CalibrationStatistics(stats, {e.name: expert_fingerprint(e) for e in experts})


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_linear_merge_equals_weighted_sum_of_deltas():
    experts = [make_expert("hate", 0), make_expert("violence", 1), make_expert("sexual", 2)]
    weights = [1.0, 0.5, 2.0]
    merged = merging.merge_linear(experts, weights)
    for m in MODULES:
        expected = sum(w * e.delta_weight(m) for e, w in zip(experts, weights))
        assert relative_error(merged.delta_weight(m), expected) <= 1e-6
        assert merged.modules[m].rank == 9
    assert merged.categories == ["Hate", "Violence", "Sexual"]


def test_zero_weight_leaves_the_expert_out():
    experts = [make_expert("hate", 0), make_expert("violence", 1)]
    merged = merging.merge_linear(experts, [1.0, 0.0])
    for m in MODULES:
        assert relative_error(merged.delta_weight(m), experts[0].delta_weight(m)) <= 1e-6
    assert merged.categories == ["Hate"]


def test_co_merge_rows_come_from_the_most_active_expert_not_the_largest_weights():
    # Expert "loud" has 10x larger weights, but on calibration inputs "quiet" is more active on
    # even rows: the statistics, not the norms, must decide.
    loud, quiet = make_expert("loud", 0, scale=10.0), make_expert("quiet", 1, scale=1.0)
    activations = {"loud": {}, "quiet": {}}
    for m, (o, _) in MODULES.items():
        even = torch.arange(o) % 2 == 0
        activations["loud"][m] = torch.where(even, torch.tensor(1.0), torch.tensor(5.0))
        activations["quiet"][m] = torch.where(even, torch.tensor(3.0), torch.tensor(1.0))
    stats = make_statistics([loud, quiet], activations)
    weights = [1.0, 0.8]
    merged = merging.co_merge([loud, quiet], weights, stats, granularity="row")
    for m, (o, _) in MODULES.items():
        delta = merged.delta_weight(m).reshape(o, -1)
        loud_rows = loud.delta_weight(m).reshape(o, -1)
        quiet_rows = quiet.delta_weight(m).reshape(o, -1)
        for j in range(o):
            winner_is_quiet = 0.8 * activations["quiet"][m][j] > 1.0 * activations["loud"][m][j]
            expected = 0.8 * quiet_rows[j] if winner_is_quiet else loud_rows[j]
            assert torch.allclose(delta[j], expected, atol=1e-5, rtol=1e-6), (m, j)
        assert merged.modules[m].rank == 6  # Σ r_k: exact, no approximation
    wins = merging.co_merge_wins(merged)
    assert wins["unet.a.to_q"]["quiet"] == pytest.approx(0.5)


def test_co_merge_weights_shift_the_contest_and_zero_excludes():
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {"a": {m: torch.full((o,), 2.0) for m, (o, _) in MODULES.items()},
            "b": {m: torch.full((o,), 1.0) for m, (o, _) in MODULES.items()}}
    stats = make_statistics([a, b], acts)
    only_a = merging.co_merge([a, b], [1.0, 1.0], stats)
    b_wins = merging.co_merge([a, b], [1.0, 3.0], stats)
    excluded = merging.co_merge([a, b], [0.0, 1.0], stats)
    for m in MODULES:
        assert torch.allclose(only_a.delta_weight(m), a.delta_weight(m), atol=1e-5)
        assert torch.allclose(b_wins.delta_weight(m), 3.0 * b.delta_weight(m), atol=1e-4)
        assert torch.allclose(excluded.delta_weight(m), b.delta_weight(m), atol=1e-5)


def test_co_merge_element_mode_exact_diffs_and_svd_error_decreases_with_rank():
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {e.name: {m: torch.ones(o) for m, (o, _) in MODULES.items()} for e in (a, b)}
    stats = make_statistics([a, b], acts)
    exact = merging.co_merge([a, b], [1.0, 1.0], stats, granularity="element")
    for m in MODULES:
        da, db = a.delta_weight(m), b.delta_weight(m)
        expected = torch.where(da.abs() >= db.abs(), da, db)
        assert torch.allclose(exact.diffs[m], expected)
    errors = []
    for rank in (1, 3, 6):
        low = merging.co_merge([a, b], [1.0, 1.0], stats, granularity="element", rank=rank)
        errors.append(json.loads(low.metadata["safetydpo_recipe"])["svd_relative_error"])
    assert errors[0] > errors[1] > errors[2] >= 0


def test_statistics_round_trip_and_refuse_other_experts(tmp_path):
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {e.name: {m: torch.rand(o) for m, (o, _) in MODULES.items()} for e in (a, b)}
    stats = make_statistics([a, b], acts)
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStatistics.load(path)
    for name in ("a", "b"):
        for m in MODULES:
            assert torch.equal(loaded.experts[name][m].row_activation, stats.experts[name][m].row_activation)
    changed = make_expert("a", 5)
    with pytest.raises(MergeError, match="other weights"):
        merging.co_merge([changed, b], [1, 1], loaded)
    with pytest.raises(MergeError, match="no entry"):
        merging.co_merge([make_expert("c", 2), b], [1, 1], loaded)


def test_baselines_run_and_dare_is_reproducible():
    experts = [make_expert("a", 0), make_expert("b", 1), make_expert("c", 2)]
    ties = merging.merge_ties(experts, [1, 1, 1], density=0.5)
    assert set(ties.diffs) == set(MODULES)
    d1 = merging.merge_dare(experts, [1, 1, 1], density=0.5, seed=3)
    d2 = merging.merge_dare(experts, [1, 1, 1], density=0.5, seed=3)
    d3 = merging.merge_dare(experts, [1, 1, 1], density=0.5, seed=4)
    m = "unet.a.to_q"
    assert torch.equal(d1.diffs[m], d2.diffs[m]) and not torch.equal(d1.diffs[m], d3.diffs[m])
    svd = merging.merge_svd(experts, [1, 1, 1], rank=2)
    assert svd.modules[m].rank == 2
    pruned = merging.merge_magnitude_prune(experts, [1, 1, 1], density=0.3, rank=4)
    assert pruned.modules[m].rank == 4
    full_rank = merging.merge_svd(experts, [1, 1, 1], rank=10)
    linear = merging.merge_linear(experts, [1, 1, 1])
    assert relative_error(full_rank.delta_weight(m), linear.delta_weight(m)) < 1e-5


def test_merged_result_saves_loads_and_merges_again(tmp_path):
    a, b, c = make_expert("a", 0), make_expert("b", 1), make_expert("c", 2)
    first = merging.merge_linear([a, b], [1, 1], name="ab")
    path = lora_files.save_expert(first, tmp_path / "ab.safetensors")
    loaded = lora_files.load_expert(path)
    again = merging.merge_linear([loaded, c], [0.5, 1])
    for m in MODULES:
        expected = 0.5 * (a.delta_weight(m) + b.delta_weight(m)) + c.delta_weight(m)
        assert relative_error(again.delta_weight(m), expected) <= 1e-5
    assert json.loads(loaded.metadata["safetydpo_recipe"])["method"] == "linear"


def test_bad_merges_fail_clearly():
    a, b = make_expert("a", 0), make_expert("b", 1)
    with pytest.raises(MergeError, match="no experts"):
        merging.merge_linear([], [])
    with pytest.raises(MergeError, match="≥ 0"):
        merging.merge_linear([a, b], [1, -1])
    with pytest.raises(MergeError, match="weight 0"):
        merging.merge_linear([a, b], [0, 0])
    with pytest.raises(MergeError, match="finite"):
        merging.merge_linear([a, b], [1, float("nan")])
    odd = make_expert("odd", 2, modules={"unet.a.to_q": (12, 11)})
    with pytest.raises(ArchitectureMismatchError, match="unet.a.to_q"):
        merging.merge_linear([a, odd], [1, 1])
    xl = make_expert("xl", 3)
    xl.architecture = "sdxl"
    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        merging.merge_linear([a, xl], [1, 1])
    broken = make_expert("broken", 4)
    broken.modules["unet.a.to_q"].up[0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN/Inf.*unet.a.to_q"):
        merging.merge_linear([a, broken], [1, 1])
    with pytest.raises(MergeError, match="statistics"):
        merging.merge_experts([a, b], [1, 1], "co_merge", statistics=None)
    with pytest.raises(MergeError, match="unknown merge method"):
        merging.merge_experts([a, b], [1, 1], "average")
