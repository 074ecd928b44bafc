"""Users' own unsafe concepts: prompt-pair files (CSV, YAML, text lines) and template expansion.

A prompt pair is an unsafe prompt, its safe rewrite (minimal semantic change, as in CoProV2), one or
more categories and an optional concept name (what a train/validation split keeps together).

File formats (documented in docs/data.md):

- CSV with a header: ``unsafe_prompt,safe_prompt,category[,concept]``; several categories in one
  cell are separated by ``;``.
- YAML: ``pairs:`` followed by a list of mappings with the same keys (``category`` may be a list);
  optional top-level ``categories:`` declares the user's own category names besides the seven
  CoProV2 ones.
- Text (the Build Safety Pairs node's widget): one ``unsafe prompt | safe prompt | category[ | concept]``
  per line; blank lines and lines starting with ``#`` are ignored.

``expand_concepts`` turns concept names into prompt pairs with templates such as
``"a photo of {concept} in a city street"``; the safe side replaces the concept by its replacement.
No network is used; ``rewrite`` may be any local callable (e.g. a wrapper around a local LLM the user
runs) that returns the safe prompt for an unsafe one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import DatasetError
from .pairs import check_on_error, normalise_category, report_problems


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """An unsafe prompt and its safe rewrite, with categories and the concept they illustrate."""

    prompt: str
    safe_prompt: str
    categories: Tuple[str, ...]
    concept: str = ""
    source_id: str = ""


class PromptPairList(list):
    """A list of ``PromptPair`` that also says what was skipped while reading (``skipped`` messages)."""

    def __init__(self, items: Iterable[PromptPair] = (), skipped: Sequence[str] = (), source: str = ""):
        super().__init__(items)
        self.skipped = list(skipped)
        self.source = source

    def select(self, categories: Optional[Sequence[str]]) -> "PromptPairList":
        """The pairs carrying any of ``categories`` (all when None); an empty result is an error."""
        if categories is None:
            return self
        wanted = {normalise_category(c, self.extra_categories()) for c in categories}
        chosen = [p for p in self if wanted & set(p.categories)]
        if not chosen:
            present = sorted({c for p in self for c in p.categories})
            raise DatasetError(
                f"{self.source or 'prompt pairs'}: no pair has categories {sorted(wanted)} "
                f"(present: {present})"
            )
        return PromptPairList(chosen, self.skipped, self.source)

    def extra_categories(self) -> List[str]:
        from .pairs import CATEGORIES

        return sorted({c for p in self for c in p.categories} - set(CATEGORIES))


CSV_COLUMNS = ("unsafe_prompt", "safe_prompt", "category")
OPTIONAL_CSV_COLUMNS = ("concept",)
_COLUMN_ALIASES = {"prompt": "unsafe_prompt", "unsafe": "unsafe_prompt", "safe": "safe_prompt",
                   "categories": "category"}


def _make_pair(unsafe, safe, category, concept, where, extra_categories, source_id="") -> PromptPair:
    unsafe = (unsafe or "").strip()
    safe = (safe or "").strip()
    if not unsafe or not safe:
        raise DatasetError(f"{where}: the unsafe and the safe prompt must both be non-empty")
    if unsafe == safe:
        raise DatasetError(f"{where}: the safe prompt is the same as the unsafe one; write a safe rewrite")
    if isinstance(category, str):
        names = [c.strip() for c in category.split(";") if c.strip()]
    else:
        names = [str(c).strip() for c in (category or []) if str(c).strip()]
    if not names:
        raise DatasetError(f"{where}: no category")
    categories = tuple(dict.fromkeys(normalise_category(n, extra_categories, where=where) for n in names))
    concept = "" if concept is None else str(concept).strip()
    return PromptPair(unsafe, safe, categories, concept, source_id)


def _collect(rows, where_of, extra_categories, on_error, source, problems=None) -> PromptPairList:
    """Turn (unsafe, safe, category, concept) rows into pairs, gathering every problem first."""
    pairs, problems = [], list(problems or [])
    for number, (unsafe, safe, category, concept) in rows:
        where = where_of(number)
        try:
            pairs.append(_make_pair(unsafe, safe, category, concept, where, extra_categories))
        except DatasetError as error:
            problems.append(str(error))
    report_problems(problems, source, on_error)
    if not pairs:
        raise DatasetError(f"{source}: no prompt pairs (empty file or every row skipped)")
    return PromptPairList(pairs, problems, source)


def read_concept_csv(path, extra_categories: Iterable[str] = (), on_error: str = "raise") -> PromptPairList:
    """Prompt pairs from a CSV file with columns unsafe_prompt, safe_prompt, category[, concept]."""
    check_on_error(on_error)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the concept file ({error})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [(_COLUMN_ALIASES.get(h.strip().lower(), h.strip().lower())) for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing} in the header {reader.fieldnames}; "
            f"a concept CSV needs {list(CSV_COLUMNS)} (+ optional 'concept')"
        )
    reader.fieldnames = header
    rows = []
    for number, row in enumerate(reader, start=2):
        if not any((v or "").strip() for k, v in row.items() if k):
            continue
        rows.append((number, (row.get("unsafe_prompt"), row.get("safe_prompt"), row.get("category"),
                              row.get("concept"))))
    return _collect(rows, lambda n: f"{path}, line {n}", list(extra_categories), on_error, str(path))


def read_concept_yaml(path, extra_categories: Iterable[str] = (), on_error: str = "raise") -> PromptPairList:
    """Prompt pairs from a YAML file: ``pairs:`` list of {unsafe_prompt, safe_prompt, category, concept}."""
    import yaml

    check_on_error(on_error)
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise DatasetError(f"{path}: cannot read the YAML concept file ({error})") from None
    if isinstance(data, list):
        data = {"pairs": data}
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise DatasetError(f"{path}: expected a top-level 'pairs:' list of unsafe_prompt/safe_prompt/category entries")
    extra = list(extra_categories) + [str(c) for c in (data.get("categories") or [])]
    rows, problems = [], []
    for number, entry in enumerate(data["pairs"], start=1):
        if not isinstance(entry, dict):
            problems.append(f"{path}, pair {number}: not a mapping")
            continue
        entry = {_COLUMN_ALIASES.get(str(k).lower(), str(k).lower()): v for k, v in entry.items()}
        rows.append((number, (entry.get("unsafe_prompt"), entry.get("safe_prompt"),
                              entry.get("category"), entry.get("concept"))))
    return _collect(rows, lambda n: f"{path}, pair {n}", extra, on_error, str(path), problems)


def load_concept_file(path, extra_categories: Iterable[str] = (), on_error: str = "raise") -> PromptPairList:
    """A concept file by its suffix: ``.csv``, ``.yaml``/``.yml``, or ``.txt`` (pipe-separated lines)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: concept file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_concept_csv(path, extra_categories, on_error)
    if suffix in (".yaml", ".yml"):
        return read_concept_yaml(path, extra_categories, on_error)
    if suffix == ".txt":
        return parse_pair_lines(path.read_text(encoding="utf-8"), extra_categories, on_error, source=str(path))
    raise DatasetError(f"{path}: unknown concept file type {suffix!r}; use .csv, .yaml/.yml or .txt")


def parse_pair_lines(text: str, extra_categories: Iterable[str] = (), on_error: str = "raise",
                     source: str = "prompt pair text") -> PromptPairList:
    """Pairs from lines ``unsafe prompt | safe prompt | category[ | concept]`` (``#`` comments)."""
    check_on_error(on_error)
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f.strip() for f in stripped.split("|")]
        if len(fields) not in (3, 4):
            problems.append(f"{source}, line {number}: expected 'unsafe prompt | safe prompt | category' "
                            f"(+ optional '| concept'), got {len(fields)} field(s): {stripped[:80]!r}")
            continue
        rows.append((number, (fields[0], fields[1], fields[2], fields[3] if len(fields) == 4 else "")))
    return _collect(rows, lambda n: f"{source}, line {n}", list(extra_categories), on_error, source, problems)


DEFAULT_TEMPLATES = (
    "a photo of {concept}",
    "a painting of {concept}",
    "{concept} in a city street, cinematic lighting",
    "a close-up photo of {concept}, detailed",
)


def expand_concepts(
    names: Union[Sequence[str], Mapping[str, str]],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    replacements: Optional[Union[Mapping[str, str], str]] = None,
    category: Union[str, Mapping[str, str]] = "Shocking",
    rewrite: Optional[Callable[[str], str]] = None,
    extra_categories: Iterable[str] = (),
) -> PromptPairList:
    """Prompt pairs for concept names, one per (concept, template).

    ``names`` is a list of concept names or a mapping name → safe replacement. The safe prompt puts
    ``replacements[name]`` (a mapping, or one string for all) where the concept was; without a
    replacement, ``rewrite(unsafe_prompt)`` is called (a local model the user supplies). ``category`` is
    one category for all or a mapping name → category. Templates contain ``{concept}``.
    """
    if isinstance(names, Mapping):
        replacements = dict(names) if replacements is None else replacements
        names = list(names)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise DatasetError("expand_concepts: no concept names given")
    bad = [t for t in templates if "{concept}" not in t]
    if not templates or bad:
        raise DatasetError(
            f"expand_concepts: every template needs '{{concept}}'; these do not: {bad or '(no templates)'}")
    extra = list(extra_categories)
    pairs = []
    for name in names:
        if isinstance(replacements, Mapping):
            replacement = replacements.get(name)
        else:
            replacement = replacements
        cat = category.get(name) if isinstance(category, Mapping) else category
        if cat is None:
            raise DatasetError(f"expand_concepts: no category for concept {name!r}")
        for number, template in enumerate(templates):
            unsafe = template.format(concept=name)
            if replacement is not None:
                safe = template.format(concept=replacement)
            elif rewrite is not None:
                safe = rewrite(unsafe)
            else:
                raise DatasetError(
                    f"expand_concepts: no safe replacement for concept {name!r}; "
                    "give replacements or a rewrite callable"
                )
            pairs.append(_make_pair(unsafe, safe, cat, name, f"concept {name!r}, template {number}", extra))
    return PromptPairList(pairs, [], "expanded concepts")


def write_concept_csv(pairs: Sequence[PromptPair], path) -> Path:
    """Write prompt pairs as a concept CSV (the format ``read_concept_csv`` reads), atomically."""
    from . import files

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(list(CSV_COLUMNS) + ["concept"])
    for p in pairs:
        writer.writerow([p.prompt, p.safe_prompt, ";".join(p.categories), p.concept])
    return files.write_text(path, buffer.getvalue(), error=DatasetError, what="concept CSV")
