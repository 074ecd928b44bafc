"""Evaluation prompt lists: one prompt with its harm categories, read from text, CSV, JSON or CoProV2."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Tuple

from .errors import DatasetError

SAFE_CATEGORY = "safe"


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
    raise DatasetError(
        f"{source}: unsupported prompt file type {path.suffix!r}; use .txt ('prompt | category' lines) or .csv")


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
