"""Hardening in the real ComfyUI (``COMFYUI_PATH``): Cancel during training, queued graphs that share a
base model, memory over many merge-and-apply runs, and strength outside the allowed range.

Kept few and fast; they share the session's server (``comfyui_server``) and the live SD1.5 test
checkpoint of ``test_nodes_comfyui`` (whose UNet output depends on its weights, so patches show).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import comfyui_harness as harness
from comfyui_safetydpo import lora_files
from test_nodes_comfyui import LIVE_CHECKPOINT, attention_modules, live_checkpoint, live_graph, png, random_expert

MEMORY_RUNS = int(os.environ.get("SAFETYDPO_MEMORY_RUNS", "12"))
ALIASES = {"a": "hardening_alone_a.safetensors", "b": "hardening_alone_b.safetensors",
           "u": "hardening_alone_u.safetensors"}


@pytest.fixture(scope="module")
def server(comfyui_server, sd15_checkpoint):
    live = live_checkpoint(sd15_checkpoint)
    comfyui_server.add_model(live, "checkpoints", LIVE_CHECKPOINT)
    for alias in ALIASES.values():  # the same weights under other names: separately loaded model objects
        comfyui_server.add_model(live, "checkpoints", alias)
    folder = comfyui_server.base_dir / "models" / "safety_experts"
    modules = attention_modules(sd15_checkpoint)
    for seed, name in ((21, "hardening_hate"), (22, "hardening_violence")):
        lora_files.save_expert(random_expert(modules, name, "sd15", seed), folder / f"{name}.safetensors")
    return comfyui_server


def sampling_graph(checkpoint: str, expert: str = None, prefix: str = "hardening", seed: int = 11,
                   strength: float = 1.0):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube on a blue table", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "20": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": seed, "steps": 3, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": prefix}},
    }
    if expert:
        graph["10"] = {"class_type": "SafetyDPOLoadExpert",
                       "inputs": {"expert_name": f"safety_experts/{expert}.safetensors", "weight": 1.0}}
        graph["14"] = {"class_type": "SafetyDPOApplyExperts",
                       "inputs": {"model": ["1", 0], "experts": ["10", 0], "strength": strength}}
        graph["20"]["inputs"]["model"] = ["14", 0]
    return graph


def image_of(server, outputs, node="22"):
    (path,) = server.output_images(outputs, node)
    return png(path)


def test_queued_graphs_patching_one_base_model_give_the_images_they_give_alone(server):
    alone = {
        "a": image_of(server, server.run_workflow(sampling_graph(ALIASES["a"], "hardening_hate", "alone_a"))),
        "b": image_of(server, server.run_workflow(sampling_graph(ALIASES["b"], "hardening_violence", "alone_b"))),
        "u": image_of(server, server.run_workflow(sampling_graph(ALIASES["u"], None, "alone_u"))),
    }
    # the test can fail: each expert changes the image, and differently
    assert not np.array_equal(alone["a"], alone["u"]) and not np.array_equal(alone["b"], alone["u"])
    assert not np.array_equal(alone["a"], alone["b"])
    # now all three on ONE base model object, queued back to back (no waiting in between)
    ids = {
        "a": server.queue(sampling_graph(LIVE_CHECKPOINT, "hardening_hate", "shared_a")),
        "b": server.queue(sampling_graph(LIVE_CHECKPOINT, "hardening_violence", "shared_b")),
        "u": server.queue(sampling_graph(LIVE_CHECKPOINT, None, "shared_u")),
    }
    for key, prompt_id in ids.items():
        shared = image_of(server, server.wait(prompt_id, timeout=300)["outputs"])
        difference = np.abs(shared.astype(int) - alone[key].astype(int)).max()
        assert difference == 0, f"graph {key!r} on the shared model differs from its image alone (max |Δ| {difference})"


def _metric_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    return max(0, len([line for line in path.read_text().splitlines() if line.strip()]) - 1)


@pytest.fixture(scope="module")
def cancelled_training(server):
    """A Train Safety Expert workflow (300 steps, no periodic checkpoint) cancelled through POST /interrupt
    once two steps are done; what the run folder holds afterwards."""
    from test_training_comfyui import make_pairs

    make_pairs(server.base_dir / "input" / "hardening_pairs")
    graph = harness.load_workflow("train_expert_api.json")
    graph["1"]["inputs"]["ckpt_name"] = LIVE_CHECKPOINT
    graph["3"]["inputs"].update({"pairs_folder": "hardening_pairs", "expert_name": "hardening_cancel",
                                 "steps": 300, "checkpoint_every": 1000, "resume": False})
    run_dir = server.base_dir / "output" / "safetydpo_training" / "hardening_cancel"
    metrics = run_dir / "metrics.csv"
    prompt_id = server.queue(graph)
    deadline = time.time() + 240
    while _metric_rows(metrics) < 2:
        assert time.time() < deadline, f"training did not reach 2 steps:\n{server.log_text()[-3000:]}"
        time.sleep(0.05)
    at_cancel = _metric_rows(metrics)
    started = time.time()
    server.interrupt()
    with pytest.raises(harness.WorkflowError):  # an interrupted prompt ends without success
        server.wait(prompt_id, timeout=120)
    seconds = time.time() - started
    history = server._get(f"/history/{prompt_id}")[prompt_id]
    return {"graph": graph, "run_dir": run_dir, "at_cancel": at_cancel, "stopped_after": _metric_rows(metrics),
            "events": [m[0] for m in history["status"]["messages"]], "seconds": seconds}


def test_cancel_during_training_stops_within_one_step(cancelled_training):
    run = cancelled_training
    assert "execution_interrupted" in run["events"], run["events"]
    assert run["stopped_after"] <= run["at_cancel"] + 1, \
        f"Cancel after step {run['at_cancel']} stopped only after step {run['stopped_after']}"
    print(f"Cancel: pressed after step {run['at_cancel']}, stopped after step {run['stopped_after']} "
          f"({run['seconds']:.1f} s until the prompt ended)")


def test_cancel_during_training_keeps_a_loadable_checkpoint_that_resumes(server, cancelled_training):
    from comfyui_safetydpo.training import latest_checkpoint

    run = cancelled_training
    checkpoint = latest_checkpoint(run["run_dir"] / "checkpoints")
    assert checkpoint is not None, "Cancel left no checkpoint"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == run["stopped_after"]
    tensors, _ = lora_files.read_safetensors(checkpoint / "lora.safetensors")
    assert tensors and all(t.isfinite().all() for t in tensors.values())
    graph = run["graph"]
    graph["3"]["inputs"].update({"steps": run["stopped_after"] + 2, "resume": True})
    server.run_workflow(graph, timeout=300)
    expert = lora_files.load_expert(server.base_dir / "models" / "safety_experts" / "hardening_cancel.safetensors")
    assert json.loads(expert.metadata["safetydpo_recipe"])["max_steps"] == run["stopped_after"] + 2


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_many_merge_and_apply_runs_keep_memory_flat(server):
    """``SAFETYDPO_MEMORY_RUNS`` (default 12; the issue's 50 with =50) runs of workflows/merge_apply_api.json,
    each re-executing merge, apply, sampling and save (a new merged name per run)."""
    graph = live_graph("merge_apply_api.json")
    for node in graph.values():
        if node["class_type"] == "SafetyDPOLoadExpert":
            node["inputs"]["expert_name"] = node["inputs"]["expert_name"].replace(
                "test_expert_hate", "hardening_hate").replace("test_expert_violence", "hardening_violence")
    graph["16"]["inputs"]["filename_prefix"] = "hardening_memory/merged"
    pid = server.process.pid
    samples = []
    for run in range(MEMORY_RUNS + 2):
        graph["13"]["inputs"]["name"] = f"memory_{run}"
        outputs = server.run_workflow(graph, timeout=300)
        assert server.output_images(outputs, "32"), outputs
        samples.append(_rss_kib(pid))
    warm, last = samples[1], samples[-1]  # after the first run every model and cache is loaded
    growth_mib = (last - warm) / 1024
    per_run_mib = growth_mib / MEMORY_RUNS
    print(f"server RSS over {MEMORY_RUNS} runs: {warm / 1024:.0f} → {last / 1024:.0f} MiB "
          f"({per_run_mib:+.2f} MiB per run); samples {[round(s / 1024) for s in samples]}")
    assert per_run_mib < 2.0 and growth_mib < 40, f"memory grows {per_run_mib:.2f} MiB per run: {samples}"


def test_strength_outside_the_allowed_range_is_refused_before_running(server):
    """Decision: |strength| ≤ 10 (the node's min/max); ComfyUI's own validation refuses more, naming the input."""
    with pytest.raises(harness.WorkflowError) as caught:
        server.queue(sampling_graph(LIVE_CHECKPOINT, "hardening_hate", "too_strong", strength=50.0))
    message = str(caught.value)
    assert "strength" in message and "bigger than max of 10" in message, message
