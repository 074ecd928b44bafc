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


def test_merged_expert_removes_concepts_and_keeps_safe_prompts(quick_run):
    _, result, _ = quick_run
    results = result.summary["results"]
    base, merged = results["base"], results["DPO + Co-Merge"]
    assert base["unsafe_rate"] >= 0.7, base  # the base model really draws the unsafe concepts
    assert merged["unsafe_rate"] <= 0.25 * base["unsafe_rate"], merged  # a large cut, all concepts at once
    assert merged["safe_changed_oracle"] <= 0.15, merged  # safe prompts keep what they show
    assert merged["scene_kept_on_unsafe_prompts"] >= 0.7, merged  # the concept is replaced, not the scene


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
    assert expert.architecture == "demo" and expert.modules
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
