"""Least-squares merge: each expert's effect on its own concept's inputs, the base model's on safe inputs."""

from __future__ import annotations

import pytest
import torch

from shared_helpers import random_expert

from comfyui_safetydpo import lora_files, merging
from comfyui_safetydpo.errors import MergeError
from comfyui_safetydpo.least_squares_merge import (
    LayerInputStatistics,
    merge_least_squares,
    record_statistics,
)

WIDTH, OUT = 12, 10
MODULES = ("unet.block.to_k", "unet.block.to_v")


def make_expert(name, seed, rank=2, alpha=4.0):
    return random_expert(name, {m: (OUT, WIDTH) for m in MODULES}, seed, rank, alpha)


class TinyBlock(torch.nn.Module):
    """Two Linear layers named like attention projections, fed the same input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.to_k = torch.nn.Linear(WIDTH, OUT, bias=False)
        self.to_v = torch.nn.Linear(WIDTH, OUT, bias=False)
        with torch.no_grad():
            self.to_k.weight.copy_(torch.randn(OUT, WIDTH, generator=g))
            self.to_v.weight.copy_(torch.randn(OUT, WIDTH, generator=g))

    def forward(self, x):
        return self.to_k(x) + self.to_v(x)


def subspace_inputs(dims, count=200, seed=0):
    """Random input vectors that live only in the given coordinates (disjoint subspaces per group)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(count, WIDTH)
    x[:, list(dims)] = torch.randn(count, len(dims), generator=g)
    return x


GROUPS = {"hate": range(0, 4), "violence": range(4, 8)}
SAFE_DIMS = range(8, 12)


@pytest.fixture()
def setup():
    block = TinyBlock()
    root = torch.nn.Module()
    root.block = block

    def lookup(name):
        return root.get_submodule(name.split(".", 1)[1])

    experts = [make_expert("hate", 0), make_expert("violence", 1)]
    inputs = {name: subspace_inputs(dims, seed=i) for i, (name, dims) in enumerate(GROUPS.items())}
    safe = subspace_inputs(SAFE_DIMS, seed=9)
    statistics = record_statistics(experts, lookup, lambda expert: block(inputs[expert.name]), lambda: block(safe))
    return block, experts, inputs, safe, statistics


def test_recorded_gram_matrices_are_the_inputs_second_moments(setup):
    block, experts, inputs, safe, statistics = setup
    for module in MODULES:
        expected = sum(x.t() @ x / x.shape[0] for x in inputs.values())
        assert torch.allclose(statistics.concept_gram[module], expected, atol=1e-5)
        assert torch.allclose(statistics.safe_gram[module], safe.t() @ safe / safe.shape[0], atol=1e-5)
    weight_before = block.to_k.weight.clone()
    record_statistics(experts, lambda n: block.get_submodule(n.split(".")[-1]), lambda e: block(inputs[e.name]),
                      lambda: block(safe))
    assert torch.equal(block.to_k.weight, weight_before)  # experts applied only while recording


def test_merge_keeps_each_expert_on_its_inputs_and_nothing_on_safe_inputs(setup):
    _, experts, inputs, safe, statistics = setup
    merged = merge_least_squares(experts, [1.0, 1.0], statistics)
    linear = merging.merge_linear(experts, [1.0, 1.0])
    for module in MODULES:
        delta = merged.delta_weight(module)
        for expert in experts:
            x = inputs[expert.name]
            own = x @ expert.delta_weight(module).t()
            assert float((x @ delta.t() - own).norm() / own.norm()) < 0.01
        assert float((safe @ delta.t()).norm()) < 0.01 * float((safe @ linear.delta_weight(module).t()).norm())
        # exactly a LoRA of rank Σ r_k (loadable everywhere), not an approximation
        assert merged.modules[module].rank == 4


def test_weight_zero_leaves_that_concept_as_the_base_model_draws_it(setup):
    _, experts, inputs, _, statistics = setup
    merged = merge_least_squares(experts, [0.0, 1.0], statistics)
    for module in MODULES:
        delta = merged.delta_weight(module)
        left_out = inputs["hate"] @ delta.t()
        kept = inputs["violence"] @ delta.t()
        assert float(left_out.norm()) < 0.01 * float(kept.norm())
        # a weight scales the expert's own effect
    half = merge_least_squares(experts, [1.0, 0.5], statistics)
    full = merge_least_squares(experts, [1.0, 1.0], statistics)
    for module in MODULES:
        x = inputs["violence"]
        assert torch.allclose(x @ half.delta_weight(module).t(), 0.5 * (x @ full.delta_weight(module).t()), atol=1e-4)


def test_overlapping_inputs_trade_off_by_the_preserve_weight(setup):
    """When safe and concept inputs share directions, a larger λ keeps safe inputs closer to the base model."""
    block, experts, _, _, _ = setup
    shared = subspace_inputs(range(0, 12), seed=3)
    lookup = lambda name: block.get_submodule(name.split(".")[-1])  # noqa: E731
    statistics = record_statistics(experts, lookup, lambda e: block(shared), lambda: block(shared[:100]))
    changes = []
    for preserve in (0.1, 1.0, 10.0):
        merged = merge_least_squares(experts, [1.0, 1.0], statistics, preserve_weight=preserve)
        changes.append(float((shared @ merged.delta_weight(MODULES[0]).t()).norm()))
    assert changes[0] > changes[1] > changes[2]


def test_statistics_round_trip_and_refuse_other_experts(setup, tmp_path):
    _, experts, _, _, statistics = setup
    path = statistics.save(tmp_path / "stats.safetensors")
    loaded = LayerInputStatistics.load(path)
    a = merge_least_squares(experts, [1.0, 1.0], statistics)
    b = merge_least_squares(experts, [1.0, 1.0], loaded)
    for module in MODULES:
        assert torch.equal(a.delta_weight(module), b.delta_weight(module))
    changed = make_expert("hate", 7)
    with pytest.raises(MergeError, match="other weights"):
        merge_least_squares([changed, experts[1]], [1.0, 1.0], loaded)
    with pytest.raises(MergeError, match="not a least-squares statistics file"):
        lora_files.save_expert(experts[0], tmp_path / "expert.safetensors")
        LayerInputStatistics.load(tmp_path / "expert.safetensors")
    with pytest.raises(MergeError, match="λ"):
        merge_least_squares(experts, [1.0, 1.0], loaded, preserve_weight=float("nan"))


def test_merged_expert_saves_and_loads_exactly(setup, tmp_path):
    _, experts, _, _, statistics = setup
    merged = merge_least_squares(experts, [1.0, 0.5], statistics)
    path = lora_files.save_expert(merged, tmp_path / "merged.safetensors")
    loaded = lora_files.load_expert(path)
    for module in MODULES:
        assert torch.allclose(loaded.delta_weight(module), merged.delta_weight(module), atol=1e-6)
    assert merging.merge_recipe(loaded)["method"] == "least_squares"
