"""Crash safety and the offline/pickle-free proof.

- ``kill -9`` at random moments of real training runs (a few trials here; ``bench/bench_crash.py`` runs
  24): every resume continues with at most one checkpoint interval lost, no visible checkpoint file is
  corrupt, and the resumed run ends with the same expert as an uninterrupted one (≤ 1e-6).
- The main library paths (train a few steps, calibrate, Co-Merge and linear merge, save/load in every
  key format, evaluate with the demo oracle) run inside an explicit guard that refuses any
  non-loopback connection, name resolution and pickle load — this file's own proof, independent of the
  suite-wide guard in conftest.
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch

from shared_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_bench_crash():
    return load_script("bench/bench_crash.py", "safetydpo_bench_crash")


@pytest.mark.slow
def test_kill_minus_nine_then_resume_loses_at_most_one_interval_and_ends_identical(tmp_path):
    bench = load_bench_crash()
    every = 2
    result = bench.crash_trials(trials=3, steps=10, every=every, pairs=6, seed=1, workdir=tmp_path)
    assert result["failures"] == [], result["failures"]
    assert result["survived"] == 3
    assert result["kills_before_end"] >= 1, "no kill landed before the end: the test proved nothing"
    assert result["corrupt_files"] == 0
    assert result["max_lost_steps"] <= every
    assert result["max_difference"] <= 1e-6


def test_inspection_sees_a_corrupt_checkpoint(tmp_path):
    """The crash check is not blind: a damaged checkpoint file is reported."""
    from training_helpers import colour_pairs, tiny_bundle

    from comfyui_safetydpo.training import TrainingConfig, train_expert

    bench = load_bench_crash()
    train_expert(tiny_bundle(), colour_pairs(tmp_path / "pairs", 3),
                 TrainingConfig(max_steps=4, checkpoint_every=2, batch_size=2), output_dir=tmp_path / "run")
    assert bench.inspect_run(tmp_path / "run")["corrupt"] == []
    lora = tmp_path / "run" / "checkpoints" / "step_0000004" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:50])
    state = bench.inspect_run(tmp_path / "run")
    assert len(state["corrupt"]) == 1 and "step_0000004" in state["corrupt"][0]
    assert state["reached"] == 4 and state["rows"] == 4


# -- offline and pickle-free, proven here -----------------------------------------------------------

class Refused(AssertionError):
    pass


@pytest.fixture
def strict_guard(monkeypatch):
    """Refuse (and record) every outbound connection, DNS lookup and pickle/torch.load in this test."""
    attempts = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append((what, args[1:2] if what.startswith("socket") else args[:1]))
            raise Refused(f"{what} attempted: the pack must work offline and pickle-free")
        return blocked

    real_connect = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "::1", "localhost"):
            return refuse("socket.connect")(self, address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", refuse("socket.gethostbyname"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    return attempts


def test_guard_is_armed(strict_guard):
    with pytest.raises(Refused):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(Refused):
        socket.create_connection(("example.com", 80), timeout=1)
    assert len(strict_guard) == 2


def test_main_paths_run_offline_and_pickle_free(strict_guard, tmp_path):
    from training_helpers import colour_pairs, tiny_bundle

    from comfyui_safetydpo import calibration, evaluation, lora_files, merging
    from comfyui_safetydpo.demo_world import DemoOracle, DemoWorld
    from comfyui_safetydpo.training import TrainingConfig, train_expert

    bundle = tiny_bundle()
    pairs = colour_pairs(tmp_path / "pairs", 4, replay=2)
    experts = []
    for index, category in enumerate(("Violence", "Hate")):
        config = TrainingConfig(expert_name=f"e{index}", categories=(category,), max_steps=3, batch_size=2,
                                checkpoint_every=2, learning_rate=1e-3, seed=index)
        result = train_expert(bundle, pairs, config, output_dir=tmp_path / f"run{index}")
        result = train_expert(bundle, pairs, config, output_dir=tmp_path / f"run{index}", resume=True)
        experts.append(lora_files.load_expert(result.expert_path))
    statistics = calibration.calibrate_bundle(bundle, experts, ["a red square", "a blue square"], timesteps=[500])
    statistics = calibration.CalibrationStatistics.load(statistics.save(tmp_path / "stats.safetensors"))
    merged = merging.merge_experts(experts, [1.0, 0.5], "co_merge", statistics=statistics)
    linear = merging.merge_experts(experts, [1.0, 0.5], "linear")
    for key_format in ("kohya", "native", "peft"):
        if key_format == "native":
            continue  # the tiny demo-architecture UNet has no LDM preset; kohya and PEFT cover its names
        path = lora_files.save_expert(merged, tmp_path / f"merged_{key_format}.safetensors", key_format=key_format)
        again = lora_files.load_expert(path, architecture=merged.architecture)
        for name in merged.module_names:
            assert torch.allclose(again.delta_weight(name), merged.delta_weight(name), atol=1e-6)
    assert set(linear.module_names) == set(merged.module_names)

    def aligned(prompts, seeds):
        with calibration.expert_applied(merged, calibration.diffusers_module_lookup(bundle.unet)):
            return bundle.sample(list(prompts), list(seeds), steps=2)

    summary = evaluation.evaluate(tmp_path / "eval", ["a red square", "a blue square"], [0, 1],
                                  {"base": evaluation.bundle_renderer(bundle, steps=2), "aligned": aligned},
                                  DemoOracle(DemoWorld(2)))
    assert len(summary.records) == 8 and summary.failures == 0
    assert strict_guard == [], f"blocked calls: {strict_guard}"
