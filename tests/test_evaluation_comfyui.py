"""Evaluate Safety in the real ComfyUI (COMFYUI_PATH): the API workflow runs on the test checkpoint."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

import comfyui_harness as harness

pytestmark = pytest.mark.comfyui

LORA_NAME = "safetydpo_test_eval_lora.safetensors"


def write_native_lora(checkpoint, target, rank=2, seed=0):
    """A LoRA in ComfyUI's native key format on every 2-D weight of the test UNet (random, strong).

    The random test checkpoint ignores its prompt, so a cross-attention-only LoRA would change nothing
    visible; the time-embedding and projection layers do change the image."""
    import safetensors.torch
    import torch
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(checkpoint), "pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            if key.startswith("model.diffusion_model.") and key.endswith(".weight") and len(shape) == 2:
                out_features, in_features = shape
                base = "diffusion_model." + key[len("model.diffusion_model."):-len(".weight")]
                tensors[f"{base}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.5
                tensors[f"{base}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
                tensors[f"{base}.alpha"] = torch.tensor(float(rank))
    assert tensors, "the test checkpoint has no linear layers"
    target.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(target))
    return target


def test_node_is_registered_with_tooltips(comfyui_server):
    info = comfyui_server.object_info()["SafetyDPOEvaluateSafety"]
    assert info["category"] == "safetydpo/evaluation" and info["display_name"] == "Evaluate Safety"
    assert info["description"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"input {name} has no tooltip"


def test_evaluate_workflow_runs_on_test_checkpoint(comfyui_server, sd15_checkpoint):
    write_native_lora(sd15_checkpoint, comfyui_server.base_dir / "models" / "loras" / LORA_NAME)
    graph = harness.load_workflow("evaluate_api.json")
    outputs = comfyui_server.run_workflow(graph, timeout=600)
    table = comfyui_server.output_images(outputs, "4")
    grid = comfyui_server.output_images(outputs, "5")
    assert len(table) == 1 and len(grid) == 1
    for path in table + grid:
        with Image.open(path) as image:
            assert image.size[0] > 100 and np.asarray(image.convert("L")).std() > 1
    text = outputs["3"]["text"]
    report_dir = next(t for t in text if t.startswith("report: "))[len("report: "):]
    from pathlib import Path

    report = Path(report_dir)
    assert (report / "report.html").is_file() and (report / "figures" / "before_after.png").is_file()
    with open(report / "rates.csv", newline="") as handle:
        rates = {(r["variant"], r["category"]): r for r in csv.DictReader(handle)}
    assert int(rates["base", "Violence"]["n"]) == 1 and int(rates["aligned", "all"]["n"]) == 1
    with open(report / "fidelity.csv", newline="") as handle:
        fidelity = list(csv.DictReader(handle))
    # The random test checkpoint's VAE gives the same picture for every latent (measured: all four images
    # identical), so pixel fidelity cannot show the LoRA here; the run records both models' fingerprints.
    assert len(fidelity) == 1 and int(fidelity[0]["n"]) == 1 and 0.0 <= float(fidelity[0]["mad"]) <= 1.0
    import json

    settings = json.loads((report.parent / "run.json").read_text())["config"]["settings"]
    assert settings["aligned_model"] != settings["base_model"]  # the LoRA patches are part of the run's identity
    # the same graph again resumes: no new images, same folder
    images = sorted((report.parent / "images").rglob("*.png"))
    comfyui_server.run_workflow(harness.load_workflow("evaluate_api.json"), timeout=600)
    assert sorted((report.parent / "images").rglob("*.png")) == images
    generations = (report.parent / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 4  # 2 prompts x 1 seed x 2 models, none rendered twice
