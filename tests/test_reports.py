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
