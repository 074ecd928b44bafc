"""Training on several processes (CPU, gloo, two processes).

- Data parallel: 2 processes × batch b give the same expert as 1 process × batch 2b (≤ 1e-5), with
  gradient accumulation, the SFT term and replay preservation on; the launch is a real
  ``accelerate launch --multi_gpu --num_processes 2 trainer/train.py`` (torchrun underneath; with no
  GPU accelerate picks gloo on the CPU).
- ``kill -9`` of one rank mid-run (rank 0, the writer, then rank 1 in the resumed run), then
  ``--resume``: the same expert as the uninterrupted 2-process run.
- ``--per-category`` on 2 processes: the experts of training them one after another in one process.

A launch costs ~10 s of imports per process on a 2-core machine, so only the first test pays for
the real launcher; the others fork the two ranks from this (already imported) process with the
environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and run the
same ``trainer/train.py`` main; when a rank is killed the test does the launcher's part and kills
the other one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
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
            save_image_tensor(torch.rand(3, 16, 16, generator=generator) * 2 - 1,
                              root / "pairs" / "images" / f"{kind}{i}.png")
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


def train_here(config: Path, output: Path, *flags: str):
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


def fork_ranks(argv, world: int, logs: Path):
    """Start ``trainer/train.py``'s main as ``world`` ranks forked from this process; returns their pids."""
    from test_training import load_train_cli

    cli = load_train_cli()
    return fork_processes(lambda rank: cli.main([str(a) for a in argv]), world, logs)


def fork_processes(work, world: int, logs: Path):
    """Run ``work(rank)`` (returns an exit status) in ``world`` forked ranks with torchrun's environment."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # the rank: run the command line, then leave without running the parent's cleanup
            code = 1
            try:
                out = open(logs / f"rank{rank}.log", "w")
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.stdout = sys.stderr = out
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                  OMP_NUM_THREADS="1")
                from accelerate import PartialState

                PartialState._reset_state()
                code = work(rank)
            except BaseException:  # noqa: BLE001 - reported through the log and the exit status
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def reap(pids, logs: Path, timeout: float = 180, expect_success: bool = True) -> None:
    deadline = time.time() + timeout
    codes = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            raise AssertionError("ranks timed out: " + " | ".join(p.read_text()[-2000:] for p in logs.glob("*.log")))
        time.sleep(0.02)
    if expect_success:
        assert all(c == 0 for c in codes.values()), (codes, [p.read_text()[-3000:] for p in sorted(logs.glob("*.log"))])


def kill_once_checkpointed(pids, run: Path, rank: int, after_step: int, logs: Path) -> int:
    """Wait for a checkpoint past ``after_step``, kill -9 ``rank``, then the others (the launcher's part)."""
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not (latest.is_file() and int(latest.read_text().strip().split("_")[1]) > after_step):
        alive = [pid for pid in pids if os.waitpid(pid, os.WNOHANG) == (0, 0)]
        assert len(alive) == len(pids), "a rank ended before the kill: " + (logs / "rank0.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.01)
    os.kill(pids[rank], signal.SIGKILL)
    for pid in pids:
        if pid != pids[rank]:
            os.kill(pid, signal.SIGKILL)
    reap(pids, logs, expect_success=False)
    assert not (run / "dp.safetensors").exists(), "the kill landed after the end: the test proved nothing"
    return int(latest.read_text().strip().split("_")[1])


STEPS = ["--max-steps", "6", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def one_process(workspace):
    """1 process × batch 2 (the reference), trained in this process."""
    root, config = workspace
    train_here(config, root / "one", *STEPS, "--batch-size", "2")
    return load(root / "one" / "dp.safetensors")


@pytest.fixture(scope="module")
def two_processes(workspace):
    """2 processes × batch 1, uninterrupted, through the real ``accelerate launch``."""
    root, config = workspace
    out = finish(launch(config, root / "two", *STEPS, "--batch-size", "1"))
    assert json.loads(out[out.index("{"):])["experts"]["dp"] == str(root / "two" / "dp.safetensors")
    return load(root / "two" / "dp.safetensors")


def test_accelerate_launch_two_processes_equal_one_process_with_the_double_batch(workspace, one_process,
                                                                                 two_processes):
    root, config = workspace
    two = two_processes
    assert two.metadata["safetydpo_processes"] == "2"
    difference = max_difference(two, one_process)
    assert difference <= 1e-5, difference
    assert max(float(two.delta_weight(n).abs().max()) for n in two.module_names) > 1e-3  # it did train
    one_rows = (root / "one" / "metrics.csv").read_text().splitlines()
    two_rows = (root / "two" / "metrics.csv").read_text().splitlines()
    assert len(two_rows) == len(one_rows) == 7  # one writer: no row twice
    column = one_rows[0].split(",").index("loss")
    for a, b in zip(one_rows[1:], two_rows[1:]):  # the logged loss is the global batch's
        assert abs(float(a.split(",")[column]) - float(b.split(",")[column])) < 1e-4


def test_kill_minus_nine_of_one_rank_then_resume_equals_the_uninterrupted_run(workspace, two_processes):
    root, config = workspace
    argv = ["--config", config, *STEPS, "--batch-size", "1"]
    run = root / "killed"
    reached = kill_once_checkpointed(fork_ranks([*argv, "--output", run], 2, root / "logs_k1"), run, rank=0,
                                     after_step=0, logs=root / "logs_k1")
    assert 2 <= reached < 6
    again = kill_once_checkpointed(fork_ranks([*argv, "--output", run, "--resume"], 2, root / "logs_k2"), run,
                                   rank=1, after_step=reached, logs=root / "logs_k2")
    assert reached < again < 6
    reap(fork_ranks([*argv, "--output", run, "--resume"], 2, root / "logs_end"), root / "logs_end")
    resumed = load(run / "dp.safetensors")
    assert max_difference(resumed, two_processes) <= 1e-6
    assert (run / "metrics.csv").read_text().count("\n") == 7  # replayed steps are not logged twice


def test_per_category_on_two_processes_equals_one_after_another(workspace, capsys):
    root, config = workspace
    flags = ["--max-steps", "3", "--batch-size", "2", "--checkpoint-every", "0", "--per-category"]
    train_here(config, root / "serial", *flags)
    serial = json.loads(capsys.readouterr().out)["experts"]
    reap(fork_ranks(["--config", config, "--output", root / "parallel", *flags], 2, root / "logs_pc"),
         root / "logs_pc")
    text = (root / "logs_pc" / "rank0.log").read_text()
    parallel = json.loads(text[text.index("{\n"):text.rindex("}") + 1])["experts"]
    assert set(parallel) == set(serial) == {"Violence", "Hate"}
    for category in serial:
        assert Path(parallel[category]).is_file()
        a, b = load(serial[category]), load(parallel[category])
        assert a.categories == b.categories == [category]
        assert max_difference(a, b) <= 1e-6, category
    # each process trained its own category: the two logs name different ones
    logs = [(root / "logs_pc" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert ("Violence:" in logs[0]) != ("Violence:" in logs[1]) and ("Hate:" in logs[0]) != ("Hate:" in logs[1])


def test_processes_that_see_different_checkpoints_refuse_to_start(tmp_path):
    """On several machines without shared storage the ranks would resume from different steps: refused."""
    def work(rank):
        from comfyui_safetydpo import distributed
        from comfyui_safetydpo.errors import TrainingError

        group = distributed.start()
        assert group is not None and group.world == 2 and group.rank == rank
        params = [torch.full((3,), float(rank))]
        group.start_together(params, step=4)  # same step: the main process's weights everywhere
        assert torch.equal(params[0], torch.zeros(3))
        try:
            group.start_together(params, step=4 + 2 * rank)
        except TrainingError as error:
            return 0 if "shares" in str(error) else 5
        return 6

    reap(fork_processes(work, 2, tmp_path / "logs"), tmp_path / "logs", timeout=60)


def test_a_nan_on_one_process_skips_the_step_on_every_process(tmp_path):
    """A non-finite loss in one process's part of the batch: every process skips the same steps and stops
    with the same message at the same step (no process waits forever for the others)."""
    from training_helpers import colour_pairs, tiny_bundle

    from comfyui_safetydpo.encoding_cache import encode_preference_pairs
    from comfyui_safetydpo.training import TrainingConfig, denoiser_for_bundle, train_lora

    pairs = colour_pairs(tmp_path / "pairs", 4)

    def work(rank):
        from comfyui_safetydpo import distributed
        from comfyui_safetydpo.errors import TrainingError

        group = distributed.start()
        bundle = tiny_bundle()
        data = encode_preference_pairs(bundle, pairs)
        data.winner_latents[:] = float("nan")  # every pair is bad, but only rank 1 sees it
        if rank == 0:
            data = encode_preference_pairs(bundle, pairs)
        for p in bundle.unet.parameters():
            p.requires_grad_(False)
        config = TrainingConfig(max_steps=4, batch_size=2, max_bad_steps=3, gradient_accumulation=2,
                                checkpoint_every=0)
        try:
            train_lora(denoiser_for_bundle(bundle), data, config, output_dir=tmp_path / "run", parallel=group)
        except TrainingError as error:
            print(error)
            return 0 if "NaN/Inf for 3 steps in a row (at step 0)" in str(error) else 7
        return 8

    reap(fork_processes(work, 2, tmp_path / "logs"), tmp_path / "logs", timeout=120)
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()  # the main process kept the last good state


def test_accelerate_mixed_precision_applies_unless_the_trainer_flag_is_given(workspace, monkeypatch, capsys):
    root, config = workspace
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    short = ["--max-steps", "1", "--batch-size", "1", "--checkpoint-every", "0"]
    for flags, expected in (([], "bf16"), (["--mixed-precision", "no"], "no")):
        train_here(config, root / f"mp_{expected}", *short, *flags)
        recipe = json.loads(load(root / f"mp_{expected}" / "dp.safetensors").metadata["safetydpo_recipe"])
        assert recipe["mixed_precision"] == expected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    from test_training import load_train_cli

    assert load_train_cli().main(["--config", str(config), "--output", str(root / "mp_fp8"), *short]) == 2
    assert "fp8" in capsys.readouterr().err
