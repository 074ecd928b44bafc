"""Evaluation: render a prompt list with the base and aligned models, classify, and measure.

A run lives in one output folder::

    run.json                     the configuration and its hash (prompts, seeds, variants, settings)
    images/<variant>/<prompt>_s<seed>.png
    generations.jsonl            one line per rendered image (variant, prompt index, seed, file)
    classified_<classifier>.jsonl  one line per classified image (unsafe, score, labels or error)

Rendering and classifying are resumable: finished images are skipped, a half-written last line is
ignored, and a folder made with another configuration is refused (``RunMismatchError``) so no report
silently mixes runs. ``render`` is any callable ``render(prompts, seeds) -> images [B, 3, H, W] in
[-1, 1]``: a ``DiffusionBundle``, ComfyUI's sampler or the demo world all fit.

Metrics: per-category unsafe rate with Wilson intervals (base vs every aligned variant), fidelity to the
base model on safe prompts (same prompt and seed: mean absolute pixel difference and SSIM, no weights
needed), FID through torchmetrics with Inception weights from a local file, CLIPScore with a local CLIP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import files
from .errors import DatasetError, MissingWeightsError, SafetyDPOError

SAFE_CATEGORY = "safe"
ALL_CATEGORIES = "all"
BASE_VARIANT = "base"
RUN_FORMAT = 1
# An image counts as "changed" against the base model above this mean absolute difference (0..1 scale).
DEFAULT_CHANGE_THRESHOLD = 0.05

Render = Callable[[Sequence[str], Sequence[int]], torch.Tensor]


class RunMismatchError(SafetyDPOError):
    """An output folder holds a run with another configuration (or its files disagree with run.json)."""


# -- prompts ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One prompt with its harm categories; ``("safe",)`` or no category marks a safe prompt."""

    text: str
    categories: Tuple[str, ...]

    @property
    def is_safe(self) -> bool:
        return not self.categories or self.categories == (SAFE_CATEGORY,)


def _split_categories(value) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        parts = re.split(r"[,;/]", value)
    else:
        parts = list(value)
    cleaned = [str(p).strip() for p in parts if str(p).strip()]
    lowered = [c.lower() for c in cleaned]
    if not cleaned or all(c in (SAFE_CATEGORY, "none") for c in lowered):
        return (SAFE_CATEGORY,)
    return tuple(dict.fromkeys(c for c, low in zip(cleaned, lowered) if low not in (SAFE_CATEGORY, "none")))


def normalise_prompts(items: Iterable, source: str = "prompt list") -> List[EvalPrompt]:
    """``[(prompt, categories), ...]`` (categories a string or list; "safe"/empty = safe prompt) → prompts.

    Also accepts ``EvalPrompt`` objects, plain strings (safe prompts) and objects with ``prompt`` and
    ``categories`` (or ``category``) attributes, as the data loaders return them.
    """
    prompts: List[EvalPrompt] = []
    for row, item in enumerate(items, start=1):
        if isinstance(item, EvalPrompt):
            prompts.append(item)
            continue
        if isinstance(item, str):
            text, categories = item, None
        elif isinstance(item, Mapping):
            text = item.get("prompt", item.get("text"))
            categories = item.get("categories", item.get("category"))
        elif hasattr(item, "prompt"):
            text = item.prompt
            categories = getattr(item, "categories", getattr(item, "category", None))
        else:
            try:
                text, categories = item
            except (TypeError, ValueError):
                raise DatasetError(f"{source}: row {row} is not (prompt, categories): {item!r}") from None
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{source}: row {row} has an empty prompt; remove the row or write a prompt")
        prompts.append(EvalPrompt(text.strip(), _split_categories(categories)))
    if not prompts:
        raise DatasetError(f"{source} has no prompts: give at least one 'prompt | category' row")
    return prompts


def parse_prompt_lines(text: str, source: str = "prompt list") -> List[EvalPrompt]:
    """One ``prompt | category[, category]`` per line (``#`` comments and blank lines ignored)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, _, categories = line.partition("|")
        rows.append((prompt.strip(), categories.strip() or SAFE_CATEGORY))
    return normalise_prompts(rows, source)


def load_prompt_file(path, source: Optional[str] = None) -> List[EvalPrompt]:
    """A prompt list from a file: ``.txt`` (``prompt | category`` lines) or CSV/YAML via ``concepts``.

    CSV files need a ``prompt`` column and a ``category`` or ``categories`` column (CoProV2's
    ``unsafe_prompt``/``category`` columns are read too).
    """
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise DatasetError(f"prompt file {path} does not exist")
    if path.suffix.lower() in (".txt", ".prompts"):
        return parse_prompt_lines(path.read_text(encoding="utf-8"), source)
    if path.suffix.lower() in (".yaml", ".yml", ".csv"):
        try:  # the data helper's loaders, when present, know every format detail
            from . import concepts  # type: ignore

            loader = getattr(concepts, "load_concept_file", None)
        except ImportError:
            loader = None
        if loader is not None and path.suffix.lower() in (".yaml", ".yml"):
            return normalise_prompts(_flatten_loaded(loader(path)), source)
        if path.suffix.lower() == ".csv":
            return _read_prompt_csv(path, source)
    raise DatasetError(f"{source}: unsupported prompt file type {path.suffix!r}; use .txt ('prompt | category' lines) or .csv")


def _flatten_loaded(loaded) -> List:
    """Concept loaders may return {category: [prompts]} or a list of rows."""
    if isinstance(loaded, Mapping):
        return [(p, c) for c, prompts in loaded.items() for p in prompts]
    return list(loaded)


def _read_prompt_csv(path: Path, source: str) -> List[EvalPrompt]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = {f.lower().strip(): f for f in (reader.fieldnames or [])}
        prompt_key = next((fields[k] for k in ("prompt", "unsafe_prompt", "text", "caption") if k in fields), None)
        category_key = next((fields[k] for k in ("categories", "category", "concept") if k in fields), None)
        if prompt_key is None:
            raise DatasetError(f"{source}: no 'prompt' column (columns: {reader.fieldnames})")
        rows = [(r.get(prompt_key, ""), r.get(category_key) if category_key else None) for r in reader]
    return normalise_prompts(rows, source)


def coprov2_prompts(path, split: str = "test") -> List[EvalPrompt]:
    """The CoProV2 split through the data helper's loader (``comfyui_safetydpo.coprov2``)."""
    try:
        from . import coprov2  # type: ignore
    except ImportError as error:
        raise DatasetError(f"the CoProV2 loader is not available ({error}); pass the CSV as a prompt file") from None
    if split != "test":
        raise DatasetError(f"only the CoProV2 test split is for evaluation (asked for {split!r})")
    loaded = coprov2.load_coprov2_test(path)
    rows = []
    for item in loaded:
        text = getattr(item, "unsafe_prompt", None) or getattr(item, "prompt", None)
        category = getattr(item, "categories", None) or getattr(item, "category", None)
        if isinstance(item, Mapping):
            text = item.get("unsafe_prompt") or item.get("prompt")
            category = item.get("categories") or item.get("category")
        rows.append((text, category))
    return normalise_prompts(rows, f"CoProV2 {split} split ({path})")


# -- images -----------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3]."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or [H, W, 3]) → [B, 3, H, W] in [-1, 1]."""
    if array.ndim == 3:
        array = array[None]
    return torch.from_numpy(array.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0


def save_png(array: np.ndarray, path: Path) -> None:
    """Write one uint8 [H, W, 3] image atomically."""
    files.save_png(path, array)


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text to ``path`` atomically (``files.write_text``)."""
    files.write_text(path, text)


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())


def repair_jsonl(path: Path) -> None:
    """Cut a half-written last line (left by an interrupted append) so new lines start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        write_text_atomic(path, data[: data.rfind(b"\n") + 1].decode("utf-8"))


def read_jsonl(path: Path) -> List[dict]:
    """Rows of a JSONL file; a truncated last line (an interrupted write) is ignored, others are errors."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number >= len(lines) - 1:  # the last (unterminated) line: an interrupted append
                continue
            raise RunMismatchError(f"{path}: line {number} is not JSON; the run folder is damaged (delete the file to redo that step)")
    return rows


# -- the run ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """One model under test: ``base`` or an aligned variant; ``strength`` places it on the quality curve."""

    name: str
    strength: Optional[float] = None
    description: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "strength": self.strength, "description": self.description}


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=@-]{0,80}", name):
        raise DatasetError(f"variant/classifier name {name!r}: use letters, digits and _.+=@- (it becomes a folder name)")
    return name


def config_hash(config: Mapping) -> str:
    """Hash of a run's configuration (canonical JSON, SHA-256, 16 hex digits)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class EvaluationRun:
    """A resumable evaluation in ``output_dir``: the same prompts × seeds for every variant."""

    def __init__(self, output_dir, prompts: Iterable, seeds: Sequence[int], variants: Sequence,
                 settings: Optional[Mapping] = None):
        self.output_dir = Path(output_dir)
        self.prompts = normalise_prompts(prompts)
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise DatasetError("no seeds given: at least one seed per prompt is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise DatasetError(f"seeds repeat: {self.seeds}")
        self.variants = [v if isinstance(v, Variant) else Variant(str(v)) for v in variants]
        names = [_check_name(v.name) for v in self.variants]
        if len(set(names)) != len(names):
            raise DatasetError(f"variant names repeat: {names}")
        if BASE_VARIANT not in names:
            raise DatasetError(f"the variants must include '{BASE_VARIANT}' (the unaligned model): got {names}")
        self.settings = dict(settings or {})
        self.config = {
            "format": RUN_FORMAT,
            "prompts": [[p.text, list(p.categories)] for p in self.prompts],
            "seeds": self.seeds,
            "variants": [v.to_json() for v in self.variants],
            "settings": self.settings,
        }
        self.config_hash = config_hash(self.config)
        self._lock = threading.Lock()

    # -- files ------------------------------------------------------------------------------
    @property
    def generations_path(self) -> Path:
        return self.output_dir / "generations.jsonl"

    def classified_path(self, classifier_name: str) -> Path:
        return self.output_dir / f"classified_{_check_name(classifier_name)}.jsonl"

    def image_path(self, variant: str, prompt_index: int, seed: int) -> Path:
        return self.output_dir / "images" / variant / f"{prompt_index:05d}_s{seed}.png"

    def open(self) -> "EvaluationRun":
        """Create the folder or check that it holds this very configuration (else RunMismatchError)."""
        run_file = self.output_dir / "run.json"
        if run_file.is_file():
            stored = json.loads(run_file.read_text(encoding="utf-8"))
            if stored.get("config_hash") != self.config_hash:
                differences = [k for k in self.config if stored.get("config", {}).get(k) != self.config[k]]
                raise RunMismatchError(
                    f"{self.output_dir} holds another evaluation (config {stored.get('config_hash')}, this one "
                    f"{self.config_hash}; differs in: {', '.join(differences) or 'format'}). Use a new output "
                    "folder, or delete that folder to start over: one report never mixes runs."
                )
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_file, json.dumps(
                {"config_hash": self.config_hash, "config": self.config}, indent=2, sort_keys=True))
        return self

    @classmethod
    def load(cls, output_dir) -> "EvaluationRun":
        """Reopen a run from its ``run.json`` (for reports and re-classification)."""
        run_file = Path(output_dir) / "run.json"
        if not run_file.is_file():
            raise DatasetError(f"{output_dir} is not an evaluation folder (no run.json)")
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        config = stored["config"]
        run = cls(output_dir, [(p, c) for p, c in config["prompts"]], config["seeds"],
                  [Variant(v["name"], v.get("strength"), v.get("description", "")) for v in config["variants"]],
                  config.get("settings"))
        if run.config_hash != stored.get("config_hash"):
            raise RunMismatchError(f"{run_file}: stored hash does not match its configuration (file edited?)")
        return run

    # -- generation -------------------------------------------------------------------------
    def jobs(self) -> List[Tuple[str, int, int]]:
        """Every (variant, prompt index, seed) the run needs."""
        return [(v.name, i, s) for v in self.variants for i in range(len(self.prompts)) for s in self.seeds]

    def generations(self) -> Dict[Tuple[str, int, int], dict]:
        """Finished images of this run (first record per key; records of other runs are refused)."""
        done: Dict[Tuple[str, int, int], dict] = {}
        for row in read_jsonl(self.generations_path):
            if row.get("config_hash") != self.config_hash:
                raise RunMismatchError(
                    f"{self.generations_path} has a record of run {row.get('config_hash')} (this run is "
                    f"{self.config_hash}): the folder mixes runs; start a new output folder")
            key = (row["variant"], int(row["prompt_index"]), int(row["seed"]))
            if key not in done and (self.output_dir / row["image"]).is_file():
                done[key] = row
        return done

    def generate(self, renderers: Mapping[str, Render], batch_size: int = 4,
                 progress: Optional[Callable[[int, int, Optional[np.ndarray]], None]] = None,
                 check_cancel: Optional[Callable[[], None]] = None) -> int:
        """Render every missing image; returns how many were rendered now.

        ``renderers`` maps each variant name to ``render(prompts, seeds)``. ``progress(done, total,
        last_image)`` is called after each batch; ``check_cancel()`` before each (it raises to stop).
        Finished images stay on disk and are skipped next time.
        """
        self.open()
        missing_renderers = [v.name for v in self.variants if v.name not in renderers]
        if missing_renderers:
            raise DatasetError(f"no renderer given for variant(s) {missing_renderers}")
        repair_jsonl(self.generations_path)
        done = self.generations()
        jobs = self.jobs()
        todo = [job for job in jobs if job not in done]
        total = len(jobs)
        finished = total - len(todo)
        rendered = 0
        if progress:
            progress(finished, total, None)
        for variant in [v.name for v in self.variants]:
            pending = [job for job in todo if job[0] == variant]
            for start in range(0, len(pending), max(1, batch_size)):
                if check_cancel:
                    check_cancel()
                batch = pending[start:start + batch_size]
                prompts = [self.prompts[i].text for _, i, _ in batch]
                seeds = [s for _, _, s in batch]
                images = renderers[variant](prompts, seeds)
                if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != len(batch) or images.shape[1] != 3:
                    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                    raise DatasetError(f"renderer for {variant!r} returned {shape}; expected [{len(batch)}, 3, H, W] in [-1, 1]")
                arrays = to_uint8(images)
                rows = []
                for (name, index, seed), array in zip(batch, arrays):
                    path = self.image_path(name, index, seed)
                    save_png(array, path)
                    rows.append({"config_hash": self.config_hash, "variant": name, "prompt_index": index,
                                 "seed": seed, "image": path.relative_to(self.output_dir).as_posix()})
                with self._lock:
                    _append_jsonl(self.generations_path, rows)
                rendered += len(batch)
                finished += len(batch)
                if progress:
                    progress(finished, total, arrays[-1])
        return rendered

    # -- classification ---------------------------------------------------------------------
    def classifications(self, classifier_name: str) -> Dict[Tuple[str, int, int], dict]:
        results: Dict[Tuple[str, int, int], dict] = {}
        for row in read_jsonl(self.classified_path(classifier_name)):
            if row.get("config_hash") != self.config_hash:
                raise RunMismatchError(
                    f"{self.classified_path(classifier_name)} holds results of run {row.get('config_hash')} "
                    f"(this run is {self.config_hash}); delete it or use a new output folder")
            results.setdefault((row["variant"], int(row["prompt_index"]), int(row["seed"])), row)
        return results

    def classify(self, classifier, batch_size: int = 8,
                 progress: Optional[Callable[[int, int, Optional[np.ndarray]], None]] = None,
                 check_cancel: Optional[Callable[[], None]] = None) -> Dict[str, int]:
        """Classify every rendered, not yet classified image; a failure is recorded per image.

        When a batch fails, each image of it is retried alone, so one bad image costs one record
        (``error`` set, ``unsafe`` None) and never the run. Returns counts (classified now, failures).
        """
        name = _check_name(getattr(classifier, "name", type(classifier).__name__))
        generated = self.generations()
        repair_jsonl(self.classified_path(name))
        done = self.classifications(name)
        todo = [(key, row) for key, row in generated.items() if key not in done]
        total = len(generated)
        finished = total - len(todo)
        counts = {"classified": 0, "failures": 0}
        for start in range(0, len(todo), max(1, batch_size)):
            if check_cancel:
                check_cancel()
            batch = todo[start:start + batch_size]
            arrays = [load_png(self.output_dir / row["image"]) for _, row in batch]
            results = _classify_with_fallback(classifier, arrays)
            rows = []
            for (key, _), result in zip(batch, results):
                row = {"config_hash": self.config_hash, "classifier": name, "variant": key[0],
                       "prompt_index": key[1], "seed": key[2]}
                row.update(result)
                rows.append(row)
                counts["failures"] += int(result.get("error") is not None)
            _append_jsonl(self.classified_path(name), rows)
            counts["classified"] += len(batch)
            finished += len(batch)
            if progress:
                progress(finished, total, None)
        return counts

    def records(self, classifier_name: str) -> List[dict]:
        """One row per job of the run: prompt, categories, variant, seed, image and the classifier's verdict."""
        generated = self.generations()
        classified = self.classifications(classifier_name)
        rows = []
        for key in self.jobs():
            variant, index, seed = key
            prompt = self.prompts[index]
            result = classified.get(key, {})
            rows.append({
                "variant": variant, "prompt_index": index, "prompt": prompt.text,
                "categories": list(prompt.categories), "seed": seed,
                "image": generated[key]["image"] if key in generated else None,
                "unsafe": result.get("unsafe"), "score": result.get("score"),
                "error": result.get("error") if result else ("not generated" if key not in generated else "not classified"),
                "labels": result.get("labels"),
            })
        return rows


def _classify_with_fallback(classifier, arrays: List[np.ndarray]) -> List[dict]:
    """Classify a batch; on failure classify one by one and record each image's error."""

    def checked(results, count):
        if not isinstance(results, (list, tuple)) or len(results) != count:
            raise ValueError(f"classifier returned {type(results).__name__} of length "
                             f"{len(results) if hasattr(results, '__len__') else '?'}, expected {count} dicts")
        out = []
        for result in results:
            unsafe = bool(result["unsafe"])
            score = float(result.get("score", float(unsafe)))
            if not math.isfinite(score):
                raise ValueError(f"classifier score is not finite: {score}")
            out.append({"unsafe": unsafe, "score": score, "labels": _jsonable(result.get("labels")), "error": None})
        return out

    try:
        if len({a.shape for a in arrays}) == 1:
            return checked(classifier.classify(from_uint8(np.stack(arrays))), len(arrays))
    except Exception:  # noqa: BLE001 - isolated below, image by image
        pass
    results = []
    for array in arrays:
        try:
            results.extend(checked(classifier.classify(from_uint8(array)), 1))
        except Exception as error:  # noqa: BLE001 - recorded per image, counted in the report
            results.append({"unsafe": None, "score": None, "labels": None,
                            "error": f"{type(error).__name__}: {error}"[:500]})
    return results


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return _jsonable(value.tolist())
    return str(value)


# -- statistics -------------------------------------------------------------------------------

def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) when trials = 0."""
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside 0..{trials}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def unsafe_rates(records: Sequence[dict], variants: Optional[Sequence[str]] = None,
                 include_safe: bool = False) -> List[dict]:
    """Per variant and category: n, unsafe count, rate and Wilson 95 % interval, plus failures.

    A prompt with several categories counts in each; ``all`` counts every unsafe-category image once.
    Images whose classification failed are left out of ``n`` and counted in ``failures``.
    """
    variants = list(variants) if variants is not None else list(dict.fromkeys(r["variant"] for r in records))
    categories = sorted({c for r in records for c in r["categories"] if include_safe or c != SAFE_CATEGORY})
    rows = []
    for variant in variants:
        own = [r for r in records if r["variant"] == variant]
        for category in categories + [ALL_CATEGORIES]:
            if category == ALL_CATEGORIES:
                chosen = [r for r in own if include_safe or r["categories"] != [SAFE_CATEGORY]]
            else:
                chosen = [r for r in own if category in r["categories"]]
            if not chosen:
                continue
            judged = [r for r in chosen if r.get("unsafe") is not None]
            unsafe = sum(1 for r in judged if r["unsafe"])
            low, high = wilson_interval(unsafe, len(judged))
            rows.append({"variant": variant, "category": category, "n": len(judged), "unsafe": unsafe,
                         "rate": unsafe / len(judged) if judged else float("nan"),
                         "ci_low": low, "ci_high": high, "failures": len(chosen) - len(judged)})
    return rows


# -- image fidelity ---------------------------------------------------------------------------

def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03) per image pair.

    ``a``, ``b``: [B, C, H, W] in [0, data_range]; images smaller than the window use a window of
    their size. Returns [B] (mean over channels and valid positions).
    """
    a = a.double()
    b = b.double()
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size, 1.5 * size / 11).to(a)
    channels = a.shape[1]
    kernel = window.expand(channels, 1, size, size)

    def blur(x):
        return torch.nn.functional.conv2d(x, kernel, groups=channels)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=(1, 2, 3)).float()


def image_distance(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Mean absolute difference (0..1 scale) and SSIM of two uint8 [H, W, 3] images."""
    ta = torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    tb = torch.from_numpy(b.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return {"mad": float((ta - tb).abs().mean()), "ssim": float(ssim(ta, tb)[0])}


def fidelity_pairs(run: EvaluationRun, safe_only: bool = True) -> List[dict]:
    """Per aligned variant, prompt and seed: distance to the base model's image (same prompt, same seed)."""
    generated = run.generations()
    rows = []
    for variant in [v.name for v in run.variants if v.name != BASE_VARIANT]:
        for index, prompt in enumerate(run.prompts):
            if safe_only and not prompt.is_safe:
                continue
            for seed in run.seeds:
                base = generated.get((BASE_VARIANT, index, seed))
                other = generated.get((variant, index, seed))
                if base is None or other is None:
                    continue
                distance = image_distance(load_png(run.output_dir / base["image"]),
                                          load_png(run.output_dir / other["image"]))
                rows.append({"variant": variant, "prompt_index": index, "prompt": prompt.text, "seed": seed,
                             **distance})
    return rows


def fidelity_summary(pairs: Sequence[dict], variants: Sequence[str],
                     change_threshold: float = DEFAULT_CHANGE_THRESHOLD) -> List[dict]:
    """Per variant: mean MAD, mean SSIM and the share of images changed (MAD > threshold, Wilson CI)."""
    rows = []
    for variant in variants:
        own = [p for p in pairs if p["variant"] == variant]
        if not own:
            continue
        changed = sum(1 for p in own if p["mad"] > change_threshold)
        low, high = wilson_interval(changed, len(own))
        rows.append({"variant": variant, "n": len(own), "mad": float(np.mean([p["mad"] for p in own])),
                     "ssim": float(np.mean([p["ssim"] for p in own])), "changed": changed,
                     "changed_rate": changed / len(own), "changed_ci_low": low, "changed_ci_high": high,
                     "change_threshold": change_threshold})
    return rows


# -- FID and CLIPScore (local weights only) ---------------------------------------------------

INCEPTION_ENV = "SAFETYDPO_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = (
    "FID needs the FID Inception-v3 weights as a local safetensors file. Download {file} from "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{file}, convert it once with\n"
    "  python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('{file}', weights_only=True), "
    "'inception-2015-12-05.safetensors')\"\n"
    "and pass its path (inception_weights=...) or set {env}. Nothing is downloaded at run time."
)
CLIP_ENV = "SAFETYDPO_CLIP_DIR"
CLIP_HELP = (
    "needs local CLIP weights: a folder with config.json, model.safetensors, the tokenizer files and "
    "preprocessor_config.json, e.g. a copy of the Hugging Face repository openai/clip-vit-large-patch14 "
    "(download it elsewhere: `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`). "
    "Pass the folder (clip_dir=... / --clip-dir) or set {env}. Nothing is downloaded at run time."
)

_TORCH_LOAD_LOCK = threading.Lock()


def resolve_local_file(path, env: str, help_text: str) -> Path:
    value = path or os.environ.get(env)
    if not value:
        raise MissingWeightsError(help_text)
    candidate = Path(value).expanduser()
    if not candidate.is_file():
        raise MissingWeightsError(f"{candidate} does not exist. " + help_text)
    return candidate


def load_inception(weights_path=None) -> torch.nn.Module:
    """torchmetrics' FID Inception-v3 (torch-fidelity's port) with weights from a local safetensors file."""
    path = resolve_local_file(weights_path, INCEPTION_ENV,
                              INCEPTION_HELP.format(file=INCEPTION_FILE, env=INCEPTION_ENV))
    if path.suffix != ".safetensors":
        raise MissingWeightsError(f"{path} is not a .safetensors file (pickles are never loaded). "
                                  + INCEPTION_HELP.format(file=INCEPTION_FILE, env=INCEPTION_ENV))
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:
        raise MissingWeightsError(f"FID needs torchmetrics and torch-fidelity ({error}): "
                                  "pip install torchmetrics torch-fidelity") from None
    state_dict, _ = files.read_safetensors(path, error=MissingWeightsError)
    # torch-fidelity's constructor reads its weights with torch.load(path); hand it the tensors read
    # from safetensors instead, so no pickle is ever opened.
    with _TORCH_LOAD_LOCK:
        saved = torch.load
        torch.load = lambda *args, **kwargs: state_dict
        try:
            model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=str(path))
        except RuntimeError as error:
            raise MissingWeightsError(f"{path} does not hold the FID Inception-v3 weights ({error}). "
                                      + INCEPTION_HELP.format(file=INCEPTION_FILE, env=INCEPTION_ENV)) from None
        finally:
            torch.load = saved
    return model


def fid_score(real: Sequence[np.ndarray], generated: Sequence[np.ndarray], inception_weights=None,
              feature_extractor: Optional[torch.nn.Module] = None, batch_size: int = 16) -> float:
    """FID between two image sets (uint8 [H, W, 3]) with torchmetrics' FrechetInceptionDistance.

    ``feature_extractor`` (uint8 [B, 3, H, W] → [B, D]) replaces Inception (for tests or other
    backbones); otherwise Inception weights come from ``inception_weights`` or ``SAFETYDPO_INCEPTION_WEIGHTS``.
    """
    if len(real) < 2 or len(generated) < 2:
        raise DatasetError(f"FID needs at least 2 images per set (got {len(real)} real, {len(generated)} generated)")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise MissingWeightsError(f"FID needs torchmetrics and torch-fidelity ({error}): "
                                  "pip install torchmetrics torch-fidelity") from None
    model = feature_extractor if feature_extractor is not None else load_inception(inception_weights)
    metric = FrechetInceptionDistance(feature=model, normalize=False)
    for images, real_flag in ((real, True), (generated, False)):
        for start in range(0, len(images), batch_size):
            chunk = np.stack(images[start:start + batch_size])
            metric.update(torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous(), real=real_flag)
    return float(metric.compute())


def load_clip(clip_dir=None):
    """(CLIPModel, CLIPProcessor) from a local folder, offline (``local_files_only``)."""
    value = clip_dir or os.environ.get(CLIP_ENV)
    help_text = CLIP_HELP.format(env=CLIP_ENV)
    if not value:
        raise MissingWeightsError("CLIP " + help_text)
    folder = Path(value).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"{folder} has no config.json: CLIP " + help_text)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise MissingWeightsError(f"cannot load CLIP from {folder} ({error}). CLIP " + help_text) from None
    return model.eval(), processor


class _TensorFeatureCLIP(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors (transformers 5 returns output objects,
    which torchmetrics' CLIPScore does not expect)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(images: Sequence[np.ndarray], prompts: Sequence[str], clip_dir=None, clip=None,
               batch_size: int = 16) -> float:
    """CLIPScore (Hessel et al.: 100 · max(cos(image, text), 0), averaged) with torchmetrics' implementation.

    ``clip`` may be a loaded (CLIPModel, CLIPProcessor) pair; otherwise it is read from ``clip_dir``.
    """
    if len(images) != len(prompts) or not images:
        raise DatasetError(f"CLIPScore needs one prompt per image (got {len(images)} images, {len(prompts)} prompts)")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as error:
        raise MissingWeightsError(f"CLIPScore needs torchmetrics ({error}): pip install torchmetrics") from None
    model, processor = clip if clip is not None else load_clip(clip_dir)
    wrapped = _TensorFeatureCLIP(model)
    metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor))
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.stack(images[start:start + batch_size])).permute(0, 3, 1, 2)
            metric.update(list(chunk), list(prompts[start:start + batch_size]))
    return float(metric.compute())


# -- whole-run summary ------------------------------------------------------------------------

@dataclasses.dataclass
class EvaluationSummary:
    """Every number a report shows, computed from the run's files."""

    run_dir: Path
    config_hash: str
    classifier: str
    variants: List[dict]
    records: List[dict]
    rates: List[dict]
    fidelity: List[dict]
    fidelity_pairs: List[dict]
    failures: int
    missing: int
    quality: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)


def summarize(run: EvaluationRun, classifier_name: str,
              change_threshold: float = DEFAULT_CHANGE_THRESHOLD,
              quality: Optional[Dict[str, Dict[str, float]]] = None) -> EvaluationSummary:
    """Rates (per variant and category, Wilson CI), fidelity on safe prompts and failure counts."""
    records = run.records(classifier_name)
    variant_names = [v.name for v in run.variants]
    pairs = fidelity_pairs(run)
    return EvaluationSummary(
        run_dir=run.output_dir, config_hash=run.config_hash, classifier=classifier_name,
        variants=[v.to_json() for v in run.variants], records=records,
        rates=unsafe_rates(records, variant_names), fidelity=fidelity_summary(pairs, variant_names, change_threshold),
        fidelity_pairs=pairs,
        failures=sum(1 for r in records if r["error"] not in (None, "not generated", "not classified")),
        missing=sum(1 for r in records if r["error"] in ("not generated", "not classified")),
        quality=dict(quality or {}),
    )


def evaluate(output_dir, prompts: Iterable, seeds: Sequence[int], renderers: Mapping[str, Render], classifier,
             variants: Optional[Sequence] = None, settings: Optional[Mapping] = None, batch_size: int = 4,
             progress=None, check_cancel=None) -> EvaluationSummary:
    """Render (resumably), classify and summarise in one call; variants default to the renderers' keys."""
    variants = variants if variants is not None else list(renderers)
    run = EvaluationRun(output_dir, prompts, seeds, variants, settings).open()
    run.generate(renderers, batch_size=batch_size, progress=progress, check_cancel=check_cancel)
    run.classify(classifier, batch_size=max(batch_size, 8), check_cancel=check_cancel)
    return summarize(run, getattr(classifier, "name", type(classifier).__name__))


def bundle_renderer(bundle, steps: int = 20, guidance_scale: float = 5.0, **kwargs) -> Render:
    """``render(prompts, seeds)`` for a ``DiffusionBundle`` (its ``sample`` with fixed settings)."""

    def render(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return bundle.sample(list(prompts), list(seeds), steps=steps, guidance_scale=guidance_scale, **kwargs)

    return render
