"""Training on several processes with ``accelerate launch`` (CPU, gloo, two processes).

- Data parallel: 2 processes × batch b give the same expert as 1 process × batch 2b (≤ 1e-5), with
  gradient accumulation, the SFT term and replay preservation on.
- ``kill -9`` of one rank mid-run, then ``--resume``: the same expert as the uninterrupted run.
- ``--per-category`` on 2 processes: the experts of training them one after another in one process.

Each launch is a real ``accelerate launch --multi_gpu --num_processes 2`` of ``trainer/train.py``
(torchrun underneath; with no GPU accelerate picks the gloo backend on CPU).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")

pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's command line is not installed")


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD1.5-shaped diffusers model and a pairs dataset of two categories with replay items."""
    from training_helpers import save_tiny_diffusers_folder

    from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, ReplayItem, save_image_tensor

    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_diffusers_folder("sd15", root / "model")
    generator = torch.Generator().manual_seed(0)
    pairs, replay = [], []
    for i in range(6):
        for kind in ("w", "l"):
            save_image_tensor(torch.rand(3, 16, 16, generator=generator) * 2 - 1, root / "pairs" / "images" / f"{kind}{i}.png")
        pairs.append(PreferencePair(f"p{i}", f"a red square {i}", f"a blue square {i}", (("Violence", "Hate")[i % 2],),
                                    f"images/w{i}.png", f"images/l{i}.png", i, f"concept {i}"))
    for i in range(4):
        save_image_tensor(torch.rand(3, 16, 16, generator=generator) * 2 - 1, root / "pairs" / "images" / f"r{i}.png")
        replay.append(ReplayItem(f"r{i}", f"a green circle {i}", f"images/r{i}.png", i))
    PreferencePairs(root=root / "pairs", pairs=pairs, replay=replay).save(root / "pairs")
    config = root / "train.yaml"
    config.write_text(f"model: {model}\npairs: {root / 'pairs'}\nlearning_rate: 0.001\ndpo_beta: 500\n"
                      "sft_weight: 0.5\npreservation_weight: 0.5\ngradient_accumulation: 2\nseed: 3\n"
                      "expert_name: dp\n")
    return root, config


def launch(config: Path, output: Path, *flags: str, processes: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HOME": str(output.parent / "home")}
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(ROOT / "trainer" / "train.py"), "--config", str(config), "--output", str(output), *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"launch timed out:\n{err[-3000:]}")
    assert process.returncode == 0, f"launch failed ({process.returncode}):\n{err[-4000:]}"
    return out


def train_here(config: Path, output: Path, *flags: str) -> dict:
    """The same command line in this process (one process, no launcher)."""
    from test_training import load_train_cli

    cli = load_train_cli()
    assert cli.main(["--config", str(config), "--output", str(output), *flags]) == 0
    return cli


def load(path):
    from comfyui_safetydpo import lora_files

    return lora_files.load_expert(path)


def max_difference(a, b) -> float:
    assert set(a.module_names) == set(b.module_names)
    return max(float((a.delta_weight(n) - b.delta_weight(n)).abs().max()) for n in a.module_names)


def worker_pids(launcher_pid: int) -> dict:
    """{rank: pid} of the launcher's worker processes (children whose environment names a RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_two_processes_equal_one_process_with_the_double_batch_and_survive_kill_minus_nine(workspace, capsys):
    root, config = workspace
    steps = ["--max-steps", "12", "--checkpoint-every", "2"]
    train_here(config, root / "one", *steps, "--batch-size", "2")
    capsys.readouterr()
    reference = load(root / "one" / "dp.safetensors")

    # uninterrupted, 2 processes × batch 1
    out = finish(launch(config, root / "two", *steps, "--batch-size", "1"))
    assert json.loads(out[out.index("{"):])["experts"]["dp"] == str(root / "two" / "dp.safetensors")
    two = load(root / "two" / "dp.safetensors")
    assert two.metadata["safetydpo_processes"] == "2"
    difference = max_difference(two, reference)
    assert difference <= 1e-5, difference
    assert max(float(two.delta_weight(n).abs().max()) for n in two.module_names) > 1e-3  # it did train
    one_rows = (root / "one" / "metrics.csv").read_text().splitlines()
    two_rows = (root / "two" / "metrics.csv").read_text().splitlines()
    assert len(two_rows) == len(one_rows) == 13  # only the main process writes metrics
    header = one_rows[0].split(",")
    column = header.index("loss")
    for a, b in zip(one_rows[1:], two_rows[1:]):  # the logged loss is the global batch's
        assert abs(float(a.split(",")[column]) - float(b.split(",")[column])) < 1e-4

    # killed: kill -9 of rank 1 once a checkpoint exists, then resume on 2 processes
    run = root / "killed"
    process = launch(config, run, *steps, "--batch-size", "1")
    deadline = time.time() + 180
    while not (run / "checkpoints" / "latest").is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)
    ranks = worker_pids(process.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0, "the launcher did not notice the killed rank"
    assert not (run / "dp.safetensors").exists(), "the kill landed after the end: the test proved nothing"
    reached = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= reached < 12
    finish(launch(config, run, *steps, "--batch-size", "1", "--resume"))
    resumed = load(run / "dp.safetensors")
    assert max_difference(resumed, two) <= 1e-6
    assert (run / "metrics.csv").read_text().count("\n") == 13  # replayed steps are not logged twice


def test_per_category_on_two_processes_equals_one_after_another(workspace, capsys):
    root, config = workspace
    flags = ["--max-steps", "3", "--batch-size", "2", "--checkpoint-every", "0", "--per-category"]
    train_here(config, root / "serial", *flags)
    serial = json.loads(capsys.readouterr().out)["experts"]
    out = finish(launch(config, root / "parallel", *flags))
    parallel = json.loads(out[out.index("{"):])["experts"]
    assert set(parallel) == set(serial) == {"Violence", "Hate"}
    for category in serial:
        assert Path(parallel[category]).is_file()
        a, b = load(serial[category]), load(parallel[category])
        assert a.categories == b.categories == [category]
        assert max_difference(a, b) <= 1e-6, category
