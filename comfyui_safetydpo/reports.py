"""Reports of an evaluation: Markdown + HTML with PNG figures, and CSV/JSON of every number.

Figures (matplotlib, Agg canvas, no pyplot state): unsafe rate per category with Wilson 95 % error
bars (base vs every aligned variant), a before/after grid (unsafe-classified images blurred unless
asked otherwise), and a quality-vs-safety curve over the variants' strengths (or a scatter when the
variants have none). Every number in the Markdown/HTML comes from ``rates.csv``/``fidelity.csv``,
which are computed from ``records.csv`` (one row per image).
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from . import files
from .evaluation_prompts import SAFE_CATEGORY
from .evaluation_run import BASE_VARIANT, load_png
from .evaluation_statistics import ALL_CATEGORIES, EvaluationSummary

RATE_FIELDS = ["variant", "category", "n", "unsafe", "rate", "ci_low", "ci_high", "failures"]
FIDELITY_FIELDS = ["variant", "n", "mad", "ssim", "changed", "changed_rate", "changed_ci_low",
                   "changed_ci_high", "change_threshold"]
RECORD_FIELDS = ["variant", "prompt_index", "prompt", "categories", "seed", "image", "unsafe", "score", "error"]
PAIR_FIELDS = ["variant", "prompt_index", "prompt", "seed", "mad", "ssim"]


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (dpi 100), outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path, **options) -> None:
    """Write a figure as PNG atomically; ``options`` go to ``savefig`` (dpi, bbox_inches)."""
    files.save_png(path, figure, what="figure", **options)


def figure_to_array(figure) -> np.ndarray:
    """uint8 [H, W, 3] of a rendered figure (for the ComfyUI IMAGE outputs)."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[:, :, :3].copy()


def _write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = dict(row)
        if isinstance(out.get("categories"), list):
            out["categories"] = ";".join(out["categories"])
        writer.writerow({k: ("" if out.get(k) is None else out.get(k)) for k in fields})
    files.write_text(path, buffer.getvalue())


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _variant_colours(names: Sequence[str]) -> Dict[str, str]:
    palette = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22"]
    ordered = [BASE_VARIANT] + [n for n in names if n != BASE_VARIANT]
    return {name: palette[i % len(palette)] for i, name in enumerate(ordered)}


# -- figures ----------------------------------------------------------------------------------

def rate_figure(summary: EvaluationSummary):
    """Grouped bars: unsafe rate per category and variant, Wilson 95 % error bars."""
    variants = [v["name"] for v in summary.variants]
    categories = list(dict.fromkeys(r["category"] for r in summary.rates))
    colours = _variant_colours(variants)
    figure = new_figure(max(6.0, 1.1 * len(categories) * max(1, len(variants)) / 2 + 2), 4.2)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(variants))
    lookup = {(r["variant"], r["category"]): r for r in summary.rates}
    for v_index, variant in enumerate(variants):
        xs, heights, lows, highs = [], [], [], []
        for c_index, category in enumerate(categories):
            row = lookup.get((variant, category))
            if row is None or row["n"] == 0:
                continue
            xs.append(c_index + (v_index - (len(variants) - 1) / 2) * width)
            heights.append(100 * row["rate"])
            lows.append(max(0.0, 100 * (row["rate"] - row["ci_low"])))
            highs.append(max(0.0, 100 * (row["ci_high"] - row["rate"])))
        axes.bar(xs, heights, width=width, color=colours[variant], label=variant,
                 yerr=[lows, highs], capsize=3, error_kw={"elinewidth": 1})
    axes.set_xticks(range(len(categories)))
    axes.set_xticklabels(categories, rotation=20, ha="right")
    axes.set_ylabel("unsafe images (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"Unsafe rate per category ({summary.classifier}; bars: Wilson 95 % CI)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _blur(array: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    radius = max(2.0, min(array.shape[:2]) / 6)
    return np.asarray(Image.fromarray(array).filter(ImageFilter.GaussianBlur(radius)))


def grid_cells(summary: EvaluationSummary, max_rows: int = 6, blur_unsafe: bool = True):
    """Rows of (prompt label, [(variant, image array, unsafe flag, blurred flag)]) for the grid.

    Picks unsafe-category prompts whose base image was judged unsafe first (first seed), then other
    prompts, so the grid shows what alignment changed.
    """
    variants = [v["name"] for v in summary.variants]
    by_key = {(r["variant"], r["prompt_index"], r["seed"]): r for r in summary.records}
    first_seed = min(r["seed"] for r in summary.records)
    prompt_rows = {}
    for r in summary.records:
        if r["seed"] == first_seed and r["variant"] == BASE_VARIANT:
            prompt_rows[r["prompt_index"]] = r
    ordered = sorted(prompt_rows.values(), key=lambda r: (r["categories"] == [SAFE_CATEGORY], not r["unsafe"],
                                                          r["prompt_index"]))
    rows = []
    for base_row in ordered[:max_rows]:
        cells = []
        for variant in variants:
            record = by_key.get((variant, base_row["prompt_index"], first_seed))
            if record is None or not record.get("image"):
                cells.append((variant, None, None, False))
                continue
            image = load_png(summary.run_dir / record["image"])
            hide = bool(blur_unsafe and record.get("unsafe"))
            cells.append((variant, _blur(image) if hide else image, record.get("unsafe"), hide))
        label = f"{base_row['prompt'][:48]} [{', '.join(base_row['categories'])}]"
        rows.append((label, cells))
    return rows


def grid_figure(summary: EvaluationSummary, max_rows: int = 6, blur_unsafe: bool = True):
    """Before/after grid: rows are prompts (same seed), columns base and aligned variants."""
    rows = grid_cells(summary, max_rows, blur_unsafe)
    columns = len(summary.variants)
    figure = new_figure(1.9 * columns + 0.4, 2.0 * max(1, len(rows)) + 0.6)
    for r_index, (label, cells) in enumerate(rows):
        for c_index, (variant, image, unsafe, hidden) in enumerate(cells):
            axes = figure.add_subplot(len(rows), columns, r_index * columns + c_index + 1)
            axes.set_xticks([])
            axes.set_yticks([])
            if image is not None:
                axes.imshow(image, interpolation="nearest")
            verdict = "failed" if unsafe is None else ("UNSAFE" if unsafe else "safe")
            axes.set_title(f"{variant}: {verdict}{' (blurred)' if hidden else ''}", fontsize=7,
                           color="#b00000" if unsafe else "#004000")
            if c_index == 0:
                axes.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center", labelpad=4)
    figure.suptitle("Same prompt, same seed" + (" — unsafe images blurred" if blur_unsafe else ""), fontsize=9)
    figure.tight_layout()
    return figure


def quality_safety_figure(summary: EvaluationSummary):
    """Unsafe rate (all categories) against change on safe prompts, over strength or per variant."""
    overall = {r["variant"]: r for r in summary.rates if r["category"] == ALL_CATEGORIES}
    fidelity = {f["variant"]: f for f in summary.fidelity}
    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    with_strength = [v for v in summary.variants if v.get("strength") is not None and v["name"] in overall]
    if len(with_strength) >= 2:
        with_strength.sort(key=lambda v: v["strength"])
        xs = [v["strength"] for v in with_strength]
        axes.plot(xs, [100 * overall[v["name"]]["rate"] for v in with_strength], "o-", color="#d62728",
                  label="unsafe rate (%)")
        axes.fill_between(xs, [100 * overall[v["name"]]["ci_low"] for v in with_strength],
                          [100 * overall[v["name"]]["ci_high"] for v in with_strength], color="#d62728", alpha=0.15)
        changed = [(v["strength"], fidelity[v["name"]]["changed_rate"]) for v in with_strength if v["name"] in fidelity]
        if changed:
            axes.plot([c[0] for c in changed], [100 * c[1] for c in changed], "s--", color="#1f77b4",
                      label="safe prompts changed (%)")
        axes.set_xlabel("strength / weight")
        axes.set_ylabel("%")
        axes.set_ylim(-2, 102)
        axes.legend(fontsize=8)
        axes.set_title("Safety vs quality over strength")
    else:
        for v in summary.variants:
            name = v["name"]
            if name not in overall:
                continue
            x = 100 * fidelity[name]["mad"] if name in fidelity else 0.0
            axes.scatter([x], [100 * overall[name]["rate"]], s=40)
            axes.annotate(name, (x, 100 * overall[name]["rate"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        axes.set_xlabel("mean absolute change vs base on safe prompts (% of range)")
        axes.set_ylabel("unsafe rate, all categories (%)")
        axes.set_title("Safety vs quality per variant")
    figure.tight_layout()
    return figure


def table_figure(summary: EvaluationSummary):
    """The per-category rate table as a figure (for the node's IMAGE output)."""
    variants = [v["name"] for v in summary.variants]
    categories = list(dict.fromkeys(r["category"] for r in summary.rates))
    lookup = {(r["variant"], r["category"]): r for r in summary.rates}
    cells = []
    for category in categories:
        row = [category]
        for variant in variants:
            r = lookup.get((variant, category))
            row.append("—" if r is None or r["n"] == 0 else
                       f"{_pct(r['rate'])}% [{_pct(r['ci_low'])}–{_pct(r['ci_high'])}] n={r['n']}")
        cells.append(row)
    fidelity = {f["variant"]: f for f in summary.fidelity}
    if fidelity:
        cells.append(["safe prompts changed"] + [
            f"{_pct(fidelity[v]['changed_rate'])}% (MAD {fidelity[v]['mad']:.3f}, SSIM {fidelity[v]['ssim']:.3f})"
            if v in fidelity else "reference" for v in variants])
    figure = new_figure(2.2 + 2.6 * len(variants), 0.45 * (len(cells) + 2) + 0.6)
    axes = figure.add_subplot(1, 1, 1)
    axes.axis("off")
    table = axes.table(cellText=cells, colLabels=["category"] + variants, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    note = f"unsafe rate % [Wilson 95 % CI], classifier: {summary.classifier}"
    if summary.failures:
        note += f"; {summary.failures} image(s) failed classification (left out)"
    axes.set_title(note, fontsize=8)
    figure.tight_layout()
    return figure


# -- report -----------------------------------------------------------------------------------

@dataclasses.dataclass
class ReportFiles:
    folder: Path
    markdown: Path
    html: Path
    figures: Dict[str, Path]
    tables: Dict[str, Path]


def _markdown(summary: EvaluationSummary, figures: Dict[str, Path], folder: Path, title: str) -> str:
    lines = [f"# {title}", "",
             f"Run `{summary.config_hash}` in `{summary.run_dir}`; classifier **{summary.classifier}**. "
             f"Unsafe rate = share of images the classifier flags, with Wilson 95 % intervals; "
             f"{summary.failures} classification failure(s), {summary.missing} image(s) missing.", "",
             "## Unsafe rate per category (%)", "",
             "| variant | category | n | unsafe | rate % | 95 % CI | failures |",
             "|---|---|---|---|---|---|---|"]
    for r in summary.rates:
        lines.append(f"| {r['variant']} | {r['category']} | {r['n']} | {r['unsafe']} | {_pct(r['rate'])} | "
                     f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])} | {r['failures']} |")
    lines += ["", f"![unsafe rate per category]({figures['rates'].relative_to(folder).as_posix()})", "",
              "## Fidelity to the base model on safe prompts", "",
              "Same prompt and seed as the base model; MAD = mean absolute pixel difference (0–1 scale); "
              "changed = MAD above the threshold.", "",
              "| variant | n | MAD | SSIM | changed | changed % | 95 % CI |", "|---|---|---|---|---|---|---|"]
    for f in summary.fidelity:
        lines.append(f"| {f['variant']} | {f['n']} | {f['mad']:.4f} | {f['ssim']:.4f} | {f['changed']} | "
                     f"{_pct(f['changed_rate'])} | {_pct(f['changed_ci_low'])}–{_pct(f['changed_ci_high'])} |")
    if not summary.fidelity:
        lines.append("| (no safe prompts in this run) | | | | | | |")
    if summary.quality:
        lines += ["", "## Quality", "", "| variant | metric | value |", "|---|---|---|"]
        for variant, metrics in summary.quality.items():
            for metric, value in metrics.items():
                lines.append(f"| {variant} | {metric} | {value:.4f} |")
    lines += ["", "## Safety vs quality", "",
              f"![quality vs safety]({figures['quality_vs_safety'].relative_to(folder).as_posix()})", "",
              "## Before / after", "",
              f"![before and after]({figures['grid'].relative_to(folder).as_posix()})", "",
              "Variants: " + ", ".join(f"`{v['name']}`"
                                       + (f" (strength {v['strength']})" if v.get("strength") is not None else "")
                                       + (f": {v['description']}" if v.get("description") else "")
                                       for v in summary.variants),
              "", "Every number above is in `rates.csv`, `fidelity.csv` and `summary.json`; per-image results in "
              "`records.csv`."]
    return "\n".join(lines) + "\n"


def _html(markdown_text: str, title: str) -> str:
    """A small self-contained HTML rendering of the Markdown (tables, headings, images, paragraphs)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>"]
    in_table = False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, _, rest = line[2:].partition("](")
            out.append(f"<p><img alt='{html.escape(alt)}' src='{html.escape(rest.rstrip(')'))}'></p>")
        elif line.strip():
            text = html.escape(line).replace("**", "")
            out.append(f"<p>{text.replace('`', '')}</p>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(summary: EvaluationSummary, folder=None, blur_unsafe: bool = True, title: str = "Safety evaluation",
                 grid_rows: int = 6) -> ReportFiles:
    """Write report.md, report.html, figures/*.png and rates/fidelity/records CSVs + summary.json."""
    folder = Path(folder) if folder is not None else summary.run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"rates": folder / "rates.csv", "fidelity": folder / "fidelity.csv", "records": folder / "records.csv",
              "fidelity_pairs": folder / "fidelity_pairs.csv", "summary": folder / "summary.json"}
    _write_csv(tables["rates"], summary.rates, RATE_FIELDS)
    _write_csv(tables["fidelity"], summary.fidelity, FIDELITY_FIELDS)
    _write_csv(tables["records"], summary.records, RECORD_FIELDS)
    _write_csv(tables["fidelity_pairs"], summary.fidelity_pairs, PAIR_FIELDS)
    files.write_text(tables["summary"], json.dumps(_json_safe({
        "config_hash": summary.config_hash, "classifier": summary.classifier, "run_dir": str(summary.run_dir),
        "variants": summary.variants, "rates": summary.rates, "fidelity": summary.fidelity,
        "quality": summary.quality, "failures": summary.failures, "missing": summary.missing,
        "blurred": blur_unsafe}), indent=2, sort_keys=True))
    figures = {"rates": folder / "figures" / "unsafe_rate_by_category.png",
               "grid": folder / "figures" / "before_after.png",
               "quality_vs_safety": folder / "figures" / "quality_vs_safety.png",
               "table": folder / "figures" / "table.png"}
    save_figure(rate_figure(summary), figures["rates"])
    save_figure(grid_figure(summary, grid_rows, blur_unsafe), figures["grid"])
    save_figure(quality_safety_figure(summary), figures["quality_vs_safety"])
    save_figure(table_figure(summary), figures["table"])
    markdown_text = _markdown(summary, figures, folder, title)
    files.write_text(folder / "report.md", markdown_text)
    files.write_text(folder / "report.html", _html(markdown_text, title))
    return ReportFiles(folder, folder / "report.md", folder / "report.html", figures, tables)
