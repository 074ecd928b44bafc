"""Run every benchmark and write ``bench/results.md`` (table) and ``bench/results.csv``.

    .venv/bin/python bench/run_all.py            # full settings (minutes on a 2-core CPU)
    .venv/bin/python bench/run_all.py --tiny     # seconds: what the test suite runs
    .venv/bin/python bench/run_all.py --only merge,dpo

Each ``bench/bench_<name>.py`` has ``run(tiny: bool) -> list of rows`` (dicts with ``measure``,
``value``, ``unit``, ``ratio``, ``baseline``, ``goal``, ``verdict``) and runs alone as a script.
Timings on shared machines vary 3-5x between runs, so every claim is a ratio against a baseline
measured in the same process; absolute times are informative only.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import io
import os
import platform
import sys
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = ("benchmark", "measure", "value", "unit", "ratio", "baseline", "goal", "verdict")


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
        cpu = f"{cpu} ({model})" if model else cpu
    except OSError:
        pass
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {cpu}, {cores} cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def discover(only=None):
    names = sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in only]
    return names


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


LOAD = {}


def run_benchmarks(tiny: bool, only=None):
    """Run the benchmarks; a benchmark that crashes is reported as a failed row, not hidden."""
    LOAD["start"] = load_average()
    rows = []
    for name in discover(only):
        print(f"== bench {name} ({'tiny' if tiny else 'full'})", flush=True)
        try:
            for row in load(name).run(tiny=tiny):
                rows.append({"benchmark": name, **row})
        except Exception as error:  # noqa: BLE001 - a crash is a result to report
            traceback.print_exc()
            rows.append({"benchmark": name, "measure": "benchmark run", "value": "", "unit": "",
                         "ratio": "", "baseline": "", "goal": "runs", "verdict": f"CRASHED: {error}"})
    LOAD["end"] = load_average()
    return rows


def _is_goal(row) -> bool:
    goal = str(row.get("goal", "")).strip().lower()
    return bool(goal) and not goal.startswith(("report", "info", "baseline"))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_results(rows, out_dir: Path, tiny: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) for k in COLUMNS})
    (out_dir / "results.csv").write_text(buffer.getvalue())
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine_description()}  ",
        f"Run: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{'tiny (smoke) settings' if tiny else 'full settings'}. Ratios are against a baseline measured in "
        "the same process; absolute times on this shared CPU vary 3-5x between runs.  ",
        f"Load average (1/5/15 min) at start {LOAD.get('start', load_average())}, at end "
        f"{LOAD.get('end', load_average())}: the machine's cores are shared with other jobs, so absolute times "
        "are those of a busy machine.",
        "",
        "| benchmark | measure | value | ratio | baseline | goal | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = _format(row.get("value"))
        if row.get("unit"):
            value = f"{value} {row['unit']}"
        lines.append("| " + " | ".join([
            _format(row.get("benchmark")), _format(row.get("measure")), value, _format(row.get("ratio")),
            _format(row.get("baseline")), _format(row.get("goal")), _format(row.get("verdict")),
        ]) + " |")
    goals = [row for row in rows if _is_goal(row)]
    if goals:
        lines += ["", "## Verdict per goal", ""]
        for row in goals:
            lines.append(f"- {_format(row.get('benchmark'))}: {_format(row.get('measure'))} — ratio "
                         f"{_format(row.get('ratio')) or _format(row.get('value'))}, goal {_format(row.get('goal'))}: "
                         f"**{_format(row.get('verdict'))}**")
    if (BENCH_DIR / "notes.md").is_file():
        lines += ["", "What each row measures, why the goals stand where they do, and the GPU benchmark: "
                      "[bench/notes.md](notes.md) (written by hand; this file is written by `bench/run_all.py`)."]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke-test settings (seconds)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names, e.g. merge,dpo")
    parser.add_argument("--output", default=str(BENCH_DIR), help="folder for results.md / results.csv")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n] or None
    rows = run_benchmarks(args.tiny, only)
    write_results(rows, Path(args.output), args.tiny)
    print((Path(args.output) / "results.md").read_text())
    return 1 if any(str(r.get("verdict", "")).startswith("CRASHED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
