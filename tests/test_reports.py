"""Reports: numbers match a recomputation from records.csv, figures are valid PNGs, unsafe images blurred."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from comfyui_safetydpo import evaluation as ev
from comfyui_safetydpo import reports

from test_evaluation import PROMPTS, RED, ColourWorld

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report_run")
    world = ColourWorld()

    def half(prompts, seeds):  # removes the unsafe colour from one of the two unsafe prompts
        return world([p.replace("red ball", "blue ball") for p in prompts], seeds)

    renderers = {"base": ColourWorld(), "half": half, "full": ColourWorld({"red": "blue"})}
    variants = [ev.Variant("base", 0.0), ev.Variant("half", 0.5, "removes one prompt"), ev.Variant("full", 1.0)]
    return ev.evaluate(folder / "run", PROMPTS, [1, 2, 3], renderers, RED, variants=variants)


@pytest.fixture(scope="module")
def report(summary):
    return reports.write_report(summary)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_numbers_match_a_recomputation_from_the_csv(report, summary):
    records = read_csv(report.tables["records"])
    assert len(records) == len(PROMPTS) * 3 * 3
    # recompute every rate from the per-image rows, by hand
    expected = {}
    for row in records:
        categories = row["categories"].split(";")
        if categories == ["safe"]:
            continue
        for category in categories + ["all"]:
            n, k = expected.get((row["variant"], category), (0, 0))
            expected[row["variant"], category] = (n + 1, k + (row["unsafe"] == "True"))
    rates = read_csv(report.tables["rates"])
    assert {(r["variant"], r["category"]) for r in rates} == set(expected)
    for row in rates:
        n, k = expected[row["variant"], row["category"]]
        assert (int(row["n"]), int(row["unsafe"])) == (n, k)
        assert float(row["rate"]) == pytest.approx(k / n)
        low, high = ev.wilson_interval(k, n)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high))
    by_key = {(r["variant"], r["category"]): r for r in rates}
    assert float(by_key["base", "all"]["rate"]) == 1.0
    assert float(by_key["half", "all"]["rate"]) == 0.5
    assert float(by_key["full", "all"]["rate"]) == 0.0
    # the Markdown table shows exactly these numbers
    markdown = report.markdown.read_text()
    shown = re.findall(r"^\| (\w+) \| ([\w ]+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+)–([\d.]+) \| (\d+) \|$",
                       markdown, flags=re.M)
    assert len(shown) == len(rates)
    for variant, category, n, k, rate, low, high, failures in shown:
        row = by_key[variant, category]
        assert (n, k, failures) == (row["n"], row["unsafe"], row["failures"])
        assert float(rate) == pytest.approx(100 * float(row["rate"]), abs=0.05)
        assert float(low) == pytest.approx(100 * float(row["ci_low"]), abs=0.05)
        assert float(high) == pytest.approx(100 * float(row["ci_high"]), abs=0.05)
    # fidelity numbers: recomputed from the per-pair CSV
    pairs = read_csv(report.tables["fidelity_pairs"])
    for row in read_csv(report.tables["fidelity"]):
        own = [p for p in pairs if p["variant"] == row["variant"]]
        assert int(row["n"]) == len(own) == 6
        assert float(row["mad"]) == pytest.approx(np.mean([float(p["mad"]) for p in own]))
    summary_json = json.loads(report.tables["summary"].read_text())
    assert summary_json["config_hash"] == summary.config_hash and summary_json["blurred"] is True
    assert "<table>" in report.html.read_text()


def test_figures_are_valid_pngs(report):
    for name, path in report.figures.items():
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 200 and image.size[1] > 100
            assert np.asarray(image.convert("L")).std() > 5  # not blank
        assert f"]({path.relative_to(report.folder).as_posix()})" in report.markdown.read_text() or name == "table"


def test_unsafe_images_are_blurred_unless_asked(summary):
    blurred = reports.grid_cells(summary, blur_unsafe=True)
    clear = reports.grid_cells(summary, blur_unsafe=False)
    assert blurred[0][0].startswith("a red")  # unsafe prompts first
    for (label, cells), (_, raw_cells) in zip(blurred, clear):
        for (variant, image, unsafe, hidden), (_, raw, _, raw_hidden) in zip(cells, raw_cells):
            assert hidden == bool(unsafe) and not raw_hidden
            if hidden:
                assert np.abs(image.astype(int) - raw.astype(int)).mean() > 0.5  # the seed noise is smoothed
            else:
                assert np.array_equal(image, raw)
    assert any(c[3] for _, cells in blurred for c in cells)


def test_quality_vs_safety_without_strengths(tmp_path):
    summary = ev.evaluate(tmp_path / "run", PROMPTS, [1],
                          {"base": ColourWorld(), "aligned": ColourWorld({"red": "blue"})}, RED)
    files = reports.write_report(summary, tmp_path / "out", blur_unsafe=False)
    assert files.figures["quality_vs_safety"].read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads(files.tables["summary"].read_text())["blurred"] is False
    table = reports.figure_to_array(reports.table_figure(summary))
    assert table.dtype == np.uint8 and table.ndim == 3 and table.shape[2] == 3


def test_seed_table_judges_each_variant_against_the_goals():
    """The three-seed goals: the worst seed decides, and each gated variant is judged with its own weight-0 checks."""
    from comfyui_safetydpo import demo_report
    from comfyui_safetydpo.demo_evaluation import GATED_LABEL, GATED_ONE_ON_ALL_LABEL

    def result(removed, safe_changed, scene):
        return {"unsafe_rate": 1 - removed, "removed": removed, "safe_changed_oracle": safe_changed,
                "safe_changed_pixels": safe_changed, "safe_mad": 0.0, "scene_kept_on_unsafe_prompts": scene,
                "scene_kept_or_as_prompted_on_unsafe_prompts": min(1.0, scene + 0.02)}

    def zero(others_max, change=None):
        row = {"concept": "red", "rate": 1.0, "base_rate": 1.0, "others_mean": others_max / 2, "others_max": others_max}
        return [row if change is None else dict(row, others_change_max=change)]

    def run(seed_scene):
        return {"results": {"base": result(0.0, 0.0, 1.0), "DPO + least-squares merge": result(0.7, 0.2, 0.9),
                            GATED_LABEL: result(0.99, 0.0, seed_scene),
                            GATED_ONE_ON_ALL_LABEL: result(0.97, 0.0, 0.98)},
                "default_variant": "DPO + least-squares merge", "weight_zero": zero(0.4),
                "gate": {"found": 1.0, "found_held_out": 1.0, "safe_on": 0.0, "weight_zero": zero(0.0, 0.0),
                         "weight_zero_one_on_all": zero(0.07, 0.0)},
                "base_prompt_fidelity": {"unsafe prompts": 0.97, "safe prompts": 0.98}, "pairs": {"same_scene": 0.99},
                "settings": {}, "timings": {"total": 1.0}}

    text = demo_report.seeds_markdown(demo_report.aggregate_seeds({0: run(0.96), 1: run(0.94)}))
    sections = text.split("Goals for the ")[1:]
    assert [s.split(" (")[0] for s in sections] == ["default merge", "prompt-gated experts",
                                                    "prompt-gated expert on all data"]
    gated, one_on_all = sections[1], sections[2]
    assert "shape and background kept ≥ 95 %: **missed** (94.0% on the worst seed" in gated  # seed 1 decides
    assert "misdrew them: 96.0%" in gated  # the lenient count beside the strict one
    assert "weight 0 brings back only that concept" in gated and "**met** (worst 0.0 points" in gated
    assert "moved another concept's rate by at most 0.0 points" in one_on_all  # 7 % left, but not moved by weight 0
    assert "moved another" not in sections[0]  # no change measured for that variant: nothing claimed
    assert "shape and background kept ≥ 95 %: **met** (98.0%" in one_on_all
    assert "**missed** (worst 0.0 points from base; other concepts 3.5% left on average, 7% at worst" in one_on_all
