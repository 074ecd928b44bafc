"""Sampling in the real ComfyUI: base model vs one merged safety LoRA vs seven experts chained.

Runs the test SD1.5-detected checkpoint (built at run time, see tests/comfyui_harness.py) in a real
ComfyUI server (``COMFYUI_PATH``). Three graphs with the same seed and settings:
base; one merged safety LoRA (rank 7×4 = 28, what Co-Merge row mode or a linear merge writes);
seven rank-4 experts applied one after another with core LoraLoaders. Each graph runs several times
in a row with a new seed; the first run includes patching the weights, the later ones are steady-state
sampling. Goal: merged / base ≤ 1.01× in steady state.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

EXPERTS = 7
RANK = 4


def _attention_modules(checkpoint: Path):
    """LDM names and shapes of the attention projections in the test checkpoint."""
    from safetensors import safe_open

    prefix = "model.diffusion_model."
    modules = {}
    with safe_open(str(checkpoint), "pt") as handle:
        for key in handle.keys():
            if key.startswith(prefix) and key.endswith(".weight") and (
                ".attn1.to_" in key or ".attn2.to_" in key
            ):
                name = key[len(prefix):-len(".weight")]
                modules[name] = tuple(handle.get_slice(key).get_shape())
    return modules


def _write_loras(checkpoint: Path, lora_dir: Path):
    """Seven rank-4 expert files and their exact rank-28 concatenation (kohya LDM-style keys)."""
    import torch
    from safetensors.torch import save_file

    modules = _attention_modules(checkpoint)
    generator = torch.Generator().manual_seed(0)
    merged = {}
    for k in range(EXPERTS):
        tensors = {}
        for name, (out_features, in_features) in modules.items():
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(RANK, in_features, generator=generator) * 0.05
            up = torch.randn(out_features, RANK, generator=generator) * 0.05
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
            merged.setdefault(key, ([], []))
            merged[key][0].append(down)
            merged[key][1].append(up / EXPERTS)
        save_file(tensors, str(lora_dir / f"bench_expert_{k}.safetensors"))
    merged_tensors = {}
    for key, (downs, ups) in merged.items():
        merged_tensors[f"{key}.lora_down.weight"] = torch.cat(downs).half()
        merged_tensors[f"{key}.lora_up.weight"] = torch.cat(ups, dim=1).half()
        # alpha = rank keeps ComfyUI's alpha/rank scale at 1: ΔW = up @ down exactly.
        merged_tensors[f"{key}.alpha"] = torch.tensor(float(EXPERTS * RANK))
    save_file(merged_tensors, str(lora_dir / "bench_merged.safetensors"))


def _graph(loras, seed: int, size: int, steps: int):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "safetydpo_test_sd15.safetensors"}},
    }
    model, clip = ["1", 0], ["1", 1]
    for index, name in enumerate(loras):
        node = str(100 + index)
        graph[node] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": name, "strength_model": 1.0, "strength_clip": 0.0}}
        model, clip = [node, 0], [node, 1]
    graph.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "bench"}},
    })
    return graph


def run(tiny: bool = False):
    import comfyui_harness as harness

    root = harness.comfyui_path()
    if root is None:
        return [{"measure": "ComfyUI sampling: merged / base", "value": None, "unit": "", "ratio": None,
                 "baseline": "base", "goal": "≤ 1.01×", "verdict": "skipped: COMFYUI_PATH unset"}]
    repeats, size, steps = (2, 64, 2) if tiny else (5, 256, 8)
    checkpoint = harness.build_sd15_checkpoint(root)
    with tempfile.TemporaryDirectory() as tmp:
        server = harness.ComfyUIServer(root, Path(tmp))
        server.prepare()
        server.add_model(checkpoint, "checkpoints")
        _write_loras(checkpoint, server.base_dir / "models" / "loras")
        server.start()
        try:
            variants = {
                "base": [],
                "merged": ["bench_merged.safetensors"],
                "seven": [f"bench_expert_{k}.safetensors" for k in range(EXPERTS)],
            }
            first, steady = {}, {}
            seed = 1
            server.run_workflow(_graph([], 0, size, steps), timeout=600)  # load the checkpoint once
            for name, loras in variants.items():
                times = []
                for _ in range(repeats):
                    seed += 1
                    start = time.perf_counter()
                    server.run_workflow(_graph(loras, seed, size, steps), timeout=600)
                    times.append(time.perf_counter() - start)
                first[name] = times[0]
                steady[name] = statistics.median(times[1:]) if len(times) > 1 else times[0]
            log = server.log_text()
        finally:
            server.stop()
    dropped = log.count("lora key not loaded")
    merged_ratio = steady["merged"] / steady["base"]
    seven_ratio = steady["seven"] / steady["base"]
    rows = [
        {"measure": f"steady-state workflow time, merged safety LoRA / base ({size}px, {steps} steps)",
         "value": steady["merged"], "unit": "s", "ratio": merged_ratio, "baseline": steady["base"],
         "goal": "≤ 1.01×", "verdict": "met" if merged_ratio <= 1.01 else "missed"},
        {"measure": "steady-state workflow time, 7 experts chained with LoraLoader / base",
         "value": steady["seven"], "unit": "s", "ratio": seven_ratio, "baseline": steady["base"],
         "goal": "report", "verdict": "reported"},
        {"measure": "first run incl. weight patching, merged / base", "value": first["merged"], "unit": "s",
         "ratio": first["merged"] / first["base"], "baseline": first["base"], "goal": "report", "verdict": "reported"},
        {"measure": "first run incl. weight patching, 7 chained / merged", "value": first["seven"], "unit": "s",
         "ratio": first["seven"] / first["merged"], "baseline": first["merged"], "goal": "report",
         "verdict": "reported"},
        {"measure": "LoRA keys dropped by ComfyUI", "value": dropped, "unit": "keys", "ratio": None,
         "baseline": None, "goal": "0", "verdict": "met" if dropped == 0 else "missed"},
    ]
    if tiny:
        for row in rows[:1]:
            row["verdict"] = "tiny setting: " + row["verdict"]
    return rows


if __name__ == "__main__":
    for row in run(tiny="--tiny" in sys.argv):
        print(row)
