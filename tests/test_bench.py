"""Every benchmark runs in its tiny setting and reports well-formed rows, so none can rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run_all  # noqa: E402

BENCHMARKS = run_all.discover()


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_in_tiny_setting(name, tmp_path):
    rows = run_all.run_benchmarks(tiny=True, only=[name])
    assert rows, f"bench_{name} reported no rows"
    for row in rows:
        assert not str(row.get("verdict", "")).startswith("CRASHED"), row
        assert row.get("measure"), row
        assert "verdict" in row and "goal" in row, row
    run_all.write_results(rows, tmp_path, tiny=True)
    table = (tmp_path / "results.md").read_text()
    assert all(str(row["measure"]) in table for row in rows)
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1


def test_there_are_benchmarks():
    assert BENCHMARKS, "bench/ has no bench_*.py"


def test_sampling_ratio_interval_resolves_a_known_one_percent_overhead():
    """The ComfyUI bench's statistics: paired rounds with 0.5 % noise resolve a 1.0 % overhead."""
    import random

    import bench_comfyui_sampling as sampling

    rng = random.Random(0)
    base, merged = [], []
    for _ in range(30):
        load = rng.uniform(0.8, 1.5)  # machine load hits both runs of a round alike
        base.append(5.0 * load * rng.gauss(1, 0.005))
        merged.append(5.0 * 1.01 * load * rng.gauss(1, 0.005))
    ratio, low, high = sampling.ratio_interval(merged, base)
    assert low < 1.01 < high and high - low < 0.01
    assert abs(ratio - 1.01) < 0.003
    _, low, high = sampling.ratio_interval(base, base)
    assert low == high == 1.0
    entry = {"status": {"messages": [["execution_start", {"timestamp": 1000}], ["execution_cached", {"nodes": []}],
                                     ["execution_success", {"timestamp": 3500}]]}}
    assert sampling._server_seconds(entry, 9.0) == 2.5
    assert sampling._server_seconds({"status": {"messages": []}}, 9.0) == 9.0


def test_operation_trace_tells_patched_weights_from_added_work():
    """The sampling bench's op trace: merged weights run the base's operations; a LoRA left beside adds some."""
    import torch

    import bench_comfyui_sampling as sampling

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8)
    merged = torch.nn.Linear(8, 8)
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    with torch.no_grad():
        merged.weight.copy_(base.weight + up @ down)  # what weight patching does
        merged.bias.copy_(base.bias)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert sampling.operation_trace(lambda: merged(x)) == sampling.operation_trace(lambda: base(x))
        beside = sampling.operation_trace(lambda: base(x) + (x @ down.T) @ up.T)  # the LoRA computed at run time
        assert beside != sampling.operation_trace(lambda: base(x))
        assert sampling.operation_trace(lambda: base(torch.randn(4, 8))) != sampling.operation_trace(lambda: base(x))
