"""Every benchmark runs in its tiny setting and reports well-formed rows, so none can rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run_all  # noqa: E402

BENCHMARKS = run_all.discover()


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
