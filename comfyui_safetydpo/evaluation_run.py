"""A resumable evaluation run in one output folder (render, classify, read back).

The folder::

    run.json                     the configuration and its hash (prompts, seeds, variants, settings)
    images/<variant>/<prompt>_s<seed>.png
    generations.jsonl            one line per rendered image (variant, prompt index, seed, file)
    classified_<classifier>.jsonl  one line per classified image (unsafe, score, labels or error)

Finished images are skipped, a half-written last line is ignored, and a folder made with another
configuration is refused (``RunMismatchError``) so no report silently mixes runs.
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
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import files
from .errors import DatasetError, SafetyDPOError
from .evaluation_prompts import normalise_prompts

BASE_VARIANT = "base"
RUN_FORMAT = 1

Render = Callable[[Sequence[str], Sequence[int]], torch.Tensor]


class RunMismatchError(SafetyDPOError):
    """An output folder holds a run with another configuration (or its files disagree with run.json)."""


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
            raise RunMismatchError(
                f"{path}: line {number} is not JSON; the run folder is damaged (delete the file to redo that step)")
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
        raise DatasetError(
            f"variant/classifier name {name!r}: use letters, digits and _.+=@- (it becomes a folder name)")
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
                if (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != len(batch)
                        or images.shape[1] != 3):
                    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                    raise DatasetError(
                        f"renderer for {variant!r} returned {shape}; expected [{len(batch)}, 3, H, W] in [-1, 1]")
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
                "error": (result.get("error") if result
                          else ("not generated" if key not in generated else "not classified")),
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
