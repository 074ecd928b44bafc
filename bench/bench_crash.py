"""Crash safety of training: ``kill -9`` at random points of a run, resume, compare with a straight run.

Every trial trains the same tiny DPO expert (the trainer tests' pixel-space UNet, CPU, fixed seeds,
a checkpoint every few steps) in a child process, kills it with SIGKILL at a random moment (once or
twice), resumes until the end, and checks:

- no visible checkpoint file is corrupt (every ``step_*`` folder reads back; ``latest`` leads to a
  complete checkpoint) and at most one checkpoint interval of finished steps is lost per kill;
- the resumed run ends with the same expert as the uninterrupted run (max |ΔW| difference ≤ 1e-6);
- what a kill leaves behind: hidden temp folders/files of interrupted writes, metrics rows written
  twice for replayed steps (reported, not hidden).

Children are forked from a small server process that imports torch and encodes the data once, so a
trial costs training time only (single-threaded, so forking is safe). ``run(tiny=True)`` does 2 trials
(< 60 s); the full setting does 24. Run alone: ``python bench/bench_crash.py [--tiny] [--trials N]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

TINY = {"trials": 2, "steps": 10, "every": 2, "pairs": 6}  # smoke only: tests/test_crash_safety.py runs the real check
FULL = {"trials": 24, "steps": 30, "every": 3, "pairs": 6}


# -- the fork server (runs in its own process) ------------------------------------------------------

def serve(workdir: Path, pair_count: int) -> None:
    """Read JSON commands from stdin; fork one training child per command; report pid and exit status."""
    import torch

    torch.set_num_threads(1)  # no thread pool exists when we fork: children are safe and deterministic
    for path in (ROOT, TESTS):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from training_helpers import colour_pairs, tiny_bundle

    from comfyui_safetydpo.encoding_cache import encode_preference_pairs
    from comfyui_safetydpo.training import TrainingConfig, denoiser_for_bundle, train_lora

    pairs = colour_pairs(workdir / "pairs", pair_count, replay=2)
    bundle = tiny_bundle()
    data = encode_preference_pairs(bundle, pairs)
    for p in bundle.unet.parameters():
        p.requires_grad_(False)
    _answer({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:  # child: train, then leave without running the parent's cleanup
            code = 0
            try:
                config = TrainingConfig(max_steps=command["steps"], checkpoint_every=command["every"], batch_size=2,
                                        learning_rate=1e-3, rank=2, alpha=2.0, dpo_beta=500.0, sft_weight=0.5,
                                        preservation_weight=0.5, replay_batch_size=2, keep_checkpoints=2,
                                        expert_name="crash")
                train_lora(denoiser_for_bundle(bundle), data, config, output_dir=Path(command["out"]),
                           resume=command["resume"])
            except BaseException as error:  # noqa: BLE001 - reported through the exit status
                print(f"child failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        _answer({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _answer({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class ForkServer:
    """The client side: start the server, run or kill training children."""

    def __init__(self, workdir: Path, pair_count: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-B", str(Path(__file__).resolve()), "--fork-server", str(workdir), str(pair_count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / "server.log", "wb"), text=True,
            env=env)
        self.workdir = workdir
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died: {(self.workdir / 'server.log').read_text()[-3000:]}")
        return json.loads(line)

    def start(self, out: Path, steps: int, every: int, resume: bool) -> int:
        self.process.stdin.write(json.dumps({"out": str(out), "steps": steps, "every": every, "resume": resume}) + "\n")
        self.process.stdin.flush()
        return self._read()["pid"]

    def finish(self) -> int:
        """Wait for the running child; its exit code (-9 when killed)."""
        return self._read()["exit"]

    def run(self, out: Path, steps: int, every: int, resume: bool) -> int:
        self.start(out, steps, every, resume)
        return self.finish()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


# -- checks ------------------------------------------------------------------------------------

def inspect_run(out: Path) -> dict:
    """State of a run folder after a kill: checkpoints readable, latest step, temp leftovers, metrics."""
    sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
    from comfyui_safetydpo.errors import SafetyDPOError
    from comfyui_safetydpo.lora_files import read_safetensors
    from comfyui_safetydpo.training import latest_checkpoint

    checkpoints = out / "checkpoints"
    corrupt, leftovers = [], []
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if entry.name.startswith("."):
                leftovers.append(entry.name)
                continue
            if entry.name == "latest":
                continue
            try:
                for name in ("lora.safetensors", "rng.safetensors"):
                    read_safetensors(entry / name)
                if (entry / "optimizer.safetensors").exists():
                    read_safetensors(entry / "optimizer.safetensors")
                json.loads((entry / "state.json").read_text())
            except (SafetyDPOError, OSError, ValueError) as error:
                corrupt.append(f"{entry.name}: {error}")
    leftovers += [p.name for p in out.glob(".*") if p.is_file()]
    latest = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
    latest_step = json.loads((latest / "state.json").read_text())["step"] if latest else 0
    steps, broken_rows = [], 0
    metrics = out / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    steps.append(int(float(row["step"])))
                except (TypeError, ValueError, KeyError):
                    broken_rows += 1
    return {"corrupt": corrupt, "leftovers": leftovers, "latest_step": latest_step,
            "reached": max(steps, default=0), "rows": len(steps), "broken_rows": broken_rows,
            "duplicate_rows": len(steps) - len(set(steps))}


def expert_difference(a: Path, b: Path) -> float:
    from comfyui_safetydpo.lora_files import load_expert

    first, second = load_expert(a), load_expert(b)
    if first.module_names != second.module_names:
        return float("inf")
    return max(float((first.delta_weight(n) - second.delta_weight(n)).abs().max()) for n in first.module_names)


def crash_trials(trials: int, steps: int, every: int, pairs: int, seed: int = 0, workdir: Path = None) -> dict:
    """Run ``trials`` kill/resume trials; returns counts and the worst values seen."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safetydpo_crash_")) if own else Path(workdir)
    server = ForkServer(workdir, pairs)
    rng = random.Random(seed)
    result = {"trials": trials, "survived": 0, "kills": 0, "kills_before_end": 0, "max_lost_steps": 0,
              "max_difference": 0.0, "corrupt_files": 0, "temp_leftovers": 0, "kills_mid_write": 0,
              "duplicate_metric_rows": 0, "broken_metric_rows": 0, "failures": []}
    try:
        started = time.time()
        reference = workdir / "reference"
        assert server.run(reference, steps, every, resume=False) == 0, "the uninterrupted run failed"
        straight_seconds = time.time() - started
        result["straight_seconds"] = straight_seconds
        for trial in range(trials):
            out = workdir / f"trial_{trial:03d}"
            problems = []
            for kill in range(rng.choice((1, 1, 2))):
                pid = server.start(out, steps, every, resume=kill > 0)
                time.sleep(rng.uniform(0.05, 1.0) * straight_seconds)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                code = server.finish()
                result["kills"] += 1
                if code == 0:
                    continue  # finished before the kill landed: nothing to check for this kill
                if code != -signal.SIGKILL:
                    problems.append(f"child exited with {code} before the kill")
                    continue
                result["kills_before_end"] += 1
                state = inspect_run(out)
                lost = state["reached"] - state["latest_step"]
                result["max_lost_steps"] = max(result["max_lost_steps"], lost)
                result["kills_mid_write"] += int(bool(state["leftovers"]))
                if state["corrupt"]:
                    problems.append(f"corrupt checkpoint files: {state['corrupt']}")
                if lost > every:
                    problems.append(f"{lost} finished steps lost (checkpoint every {every})")
            code = server.run(out, steps, every, resume=True)
            if code != 0:
                problems.append(f"resume exited with {code}")
            state = inspect_run(out)
            result["corrupt_files"] += len(state["corrupt"])
            result["temp_leftovers"] += len(state["leftovers"])
            result["duplicate_metric_rows"] += state["duplicate_rows"]
            result["broken_metric_rows"] += state["broken_rows"]
            expert = out / "crash.safetensors"
            if code == 0 and expert.is_file():
                difference = expert_difference(reference / "crash.safetensors", expert)
                result["max_difference"] = max(result["max_difference"], difference)
                if not difference <= 1e-6:
                    problems.append(f"resumed expert differs from the straight run by {difference:g}")
            elif code == 0:
                problems.append("no expert file after the resumed run")
            if problems:
                result["failures"].append(f"trial {trial}: " + "; ".join(problems))
            else:
                result["survived"] += 1
        result["seconds"] = time.time() - started
    finally:
        server.close()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def run(tiny: bool) -> list:
    setting = TINY if tiny else FULL
    r = crash_trials(setting["trials"], setting["steps"], setting["every"], setting["pairs"])
    every = setting["every"]
    rows = [
        {"measure": "kill -9 trials survived (resume ok, no corrupt file, ≤ 1 interval lost, same expert)",
         "value": r["survived"], "unit": f"of {r['trials']}", "ratio": r["survived"] / r["trials"], "baseline": "",
         "goal": "all",
         "verdict": "pass" if r["survived"] == r["trials"] else "FAIL: " + " | ".join(r["failures"])[:300]},
        {"measure": "kills that landed before the run ended", "value": r["kills_before_end"],
         "unit": f"of {r['kills']}", "ratio": "", "baseline": "", "goal": "most", "verdict": "info"},
        {"measure": "most finished steps lost by one kill", "value": r["max_lost_steps"], "unit": "steps",
         "ratio": r["max_lost_steps"] / every, "baseline": f"checkpoint every {every}", "goal": f"≤ {every}",
         "verdict": "pass" if r["max_lost_steps"] <= every else "FAIL"},
        {"measure": "max |ΔW| resumed vs uninterrupted", "value": r["max_difference"], "unit": "",
         "ratio": "", "baseline": "", "goal": "≤ 1e-6", "verdict": "pass" if r["max_difference"] <= 1e-6 else "FAIL"},
        {"measure": "corrupt visible checkpoint files", "value": r["corrupt_files"], "unit": "files", "ratio": "",
         "baseline": "", "goal": "0", "verdict": "pass" if r["corrupt_files"] == 0 else "FAIL"},
        {"measure": "kills inside a checkpoint write (hidden temp left behind)", "value": r["kills_mid_write"],
         "unit": "kills", "ratio": "", "baseline": "", "goal": "info", "verdict": "info"},
        {"measure": "hidden temp folders/files left after resume", "value": r["temp_leftovers"], "unit": "entries",
         "ratio": "", "baseline": "", "goal": "0 (never trusted, but they take disk)",
         "verdict": "pass" if r["temp_leftovers"] == 0 else "leftovers (training.save_checkpoint does not sweep them)"},
        {"measure": "metrics.csv rows written twice for replayed steps", "value": r["duplicate_metric_rows"],
         "unit": "rows", "ratio": "", "baseline": "", "goal": "0",
         "verdict": "pass" if r["duplicate_metric_rows"] == 0 else "duplicates (resume does not trim metrics.csv)"},
        {"measure": "crash trials wall time", "value": r["seconds"], "unit": "s", "ratio": "",
         "baseline": f"straight run {r['straight_seconds']:.2f} s", "goal": "tiny < 60 s", "verdict": "info"},
    ]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--fork-server", nargs=2, metavar=("WORKDIR", "PAIRS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fork_server:
        serve(Path(args.fork_server[0]), int(args.fork_server[1]))
        return 0
    if args.trials:
        (TINY if args.tiny else FULL)["trials"] = args.trials
    for row in run(args.tiny):
        print(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
