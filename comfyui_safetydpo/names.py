"""One rule for each name the nodes share: file names made from free text, and paths kept inside a folder.

Both are pure path logic (no ComfyUI); the node layer passes the folder and the error type that fits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Type, Union

from .errors import SafetyDPOError

PAIRS_FOLDER = "safety_pairs"
"""Where Build Safety Pairs writes a dataset (``output/safety_pairs/<dataset_name>``) and where the
Train node looks up a bare dataset name: the name given to one node is what the next node takes."""

_OTHER_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_NAME_LENGTH = 100


def safe_name(text: str, what: str, error: Type[SafetyDPOError] = SafetyDPOError) -> str:
    """``text`` as one file or folder name: letters, digits, '_', '-' and '.' are kept, every other run of
    characters becomes '_', leading and trailing '.'/'_' are dropped. A path ('/', '\\\\', '..') is refused,
    not rewritten, so a name never silently points somewhere else."""
    raw = str(text or "").strip()
    if "/" in raw or "\\" in raw or ".." in raw:
        raise error(f"{what} {raw!r} is a path: give a name (letters, digits, '_', '-' and '.'), no folders")
    name = _OTHER_CHARACTERS.sub("_", raw).strip("._")[:MAX_NAME_LENGTH]
    if not name:
        raise error(f"{what} {raw!r} must contain letters or digits")
    return name


def path_inside(root: Union[str, Path], name: str, what: str, where: str,
                error: Type[SafetyDPOError] = SafetyDPOError) -> Path:
    """``root/name`` with links and '..' resolved, refused when it is not inside ``root`` (or is ``root``).

    ``name`` may be relative to ``root`` or absolute (e.g. a folder path another node output); ``where``
    describes the folder in the message (e.g. "ComfyUI's input folder").
    """
    base = Path(root).resolve()
    candidate = (base / str(name).strip()).resolve()
    if base not in candidate.parents:
        raise error(f"{what} {name!r} must be inside {where} {base}; give a path relative to it")
    return candidate


def is_inside(root: Union[str, Path], name: str) -> bool:
    """Whether ``path_inside(root, name, ...)`` would accept ``name``."""
    base = Path(root).resolve()
    return base in (base / str(name).strip()).resolve().parents


def relative_name(name: str, what: str, error: Type[SafetyDPOError] = SafetyDPOError) -> str:
    """A dropdown-style name relative to a model folder ('/'-separated); absolute paths, drive letters,
    '..' and NUL are refused (ComfyUI resolves such names across several folders, so no single root)."""
    if not isinstance(name, str) or not name.strip():
        raise error(f"no {what} chosen: pick a file in the dropdown")
    normalized = name.replace("\\", "/")
    parts = normalized.split("/")
    if normalized.startswith("/") or ":" in parts[0] or ".." in parts or "\x00" in name:
        raise error(f"{what} {name!r} is not a file name inside the model folders; choose a file from the dropdown")
    return normalized
