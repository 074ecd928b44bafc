"""The reduced demo: the real chain (pairs → DPO experts → Co-Merge → patched model → oracle) on three concepts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_safetydpo import demo, lora_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    lines = []
    result = demo.run_demo(folder / "out", folder / "cache", demo.quick_settings(), report=lines.append)
    return folder, result, lines


def test_merged_expert_removes_concepts(quick_run):
    _, result, _ = quick_run
    results = result.summary["results"]
    base, merged, linear = results["base"], results["DPO + Co-Merge"], results["DPO + linear"]
    assert base["unsafe_rate"] >= 0.8, base  # the base model really draws the unsafe concepts
    assert merged["unsafe_rate"] <= 0.25 * base["unsafe_rate"], merged  # a large cut, all concepts at once
    assert merged["scene_kept_on_unsafe_prompts"] >= 0.6, merged  # the concept is replaced, not the scene
    # Collateral change is the open problem (docs/demo.md): measured 56 % here. Guard against it getting
    # worse, and check that Co-Merge keeps safe prompts better than a plain linear merge of the same experts.
    assert merged["safe_changed"] <= 0.8, merged
    assert merged["safe_changed"] < linear["safe_changed"], (merged, linear)


def test_report_and_lora_file_written(quick_run):
    folder, result, lines = quick_run
    out = folder / "out"
    text = result.report_path.read_text()
    assert "| DPO + Co-Merge |" in text and "Oracle accuracy" in text
    for name in ("unsafe_rate_per_concept.png", "before_after.png", "co_merge_wins.png"):
        assert (out / name).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) >= {"base", "DPO + Co-Merge", "DPO + linear", "DPO + TIES"}
    expert = lora_files.load_expert(result.merged_path)
    assert expert.architecture == "demo" and expert.module_names  # element Co-Merge: exact diffs
    assert all(name.startswith("unet.") for name in expert.module_names)
    assert any(float(expert.delta_weight(name).abs().max()) > 0 for name in expert.module_names)
    assert any("| DPO + Co-Merge |" in line for line in lines)


def test_second_run_reuses_the_cache(quick_run):
    folder, first, _ = quick_run
    lines = []
    second = demo.run_demo(folder / "out2", folder / "cache", demo.quick_settings(), report=lines.append)
    log = "\n".join(lines)
    assert "world model: cached" in log and "trained in" not in log
    assert second.summary["results"]["DPO + Co-Merge"]["unsafe_rate"] == first.summary["results"]["DPO + Co-Merge"]["unsafe_rate"]


def test_cli_help():
    out = subprocess.run([sys.executable, str(ROOT / "trainer" / "demo.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--output", "--cache", "--concepts", "--quick", "--fresh"):
        assert flag in out.stdout
