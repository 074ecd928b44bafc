"""Files in one place: atomic writes with umask permissions, safetensors reading with our errors, sha256.

Every file the pack writes (experts, merged LoRAs, statistics, checkpoints, caches, manifests, reports,
images) goes through ``atomic_write``: a temporary file in the target's folder, written, fsynced, given the
permissions a plain ``open()`` would give (``0o666 & ~umask``: 0644 under umask 022) and renamed over the
target. A crash or an error while writing leaves the previous file as it was and no temporary file behind.
Why the chmod: ``tempfile.mkstemp`` creates 0600, so a renamed temp file stayed unreadable to a ComfyUI
running as another user (a container, a shared models folder).

API (every writer creates missing folders and returns the path; disk errors become ``error``, by default
``SafetyDPOError``, with a message naming the file, the ``what`` and the ``advice``):
- ``write_bytes(path, data)``, ``write_text(path, text)``, ``write_json(path, data, indent=1, default=None)``,
  ``save_safetensors(path, tensors, metadata)``, ``save_png(path, image_array_or_PIL_or_figure, **save_options)``
- ``atomic_write(path, write)``: ``write(temp_path)`` fills the temp file (any other format)
- ``atomic_folder(path)``: a context manager for a folder written whole (training checkpoints)
- ``read_safetensors(path, error=LoraFormatError) -> (tensors, metadata)``, ``safetensors_keys(path)``,
  ``check_safetensors(path)``: missing, empty, pickle, truncated, corrupt → ``error`` naming the file
- ``sha256_file(path) -> hex digest``; ``current_umask()``, ``file_mode()``, ``folder_mode()``
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Type

from .errors import LoraFormatError, SafetyDPOError

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
FREE_SPACE = "free disk space or choose another folder"


# -- permissions -------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only be read by setting it, which changes it for every thread meanwhile. Linux
    reports it in ``/proc/self/status``; elsewhere a probe file created with mode 0666 shows it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    try:
        with tempfile.TemporaryDirectory() as folder:
            probe = os.path.join(folder, "probe")
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
            return 0o666 & ~os.stat(probe).st_mode & 0o777
    except OSError:
        return 0o022


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


# -- writing -----------------------------------------------------------------------------------

def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error)


def _write_errors() -> tuple:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError,)
    return (OSError, SafetensorError)


def _fsync(path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path, write: Callable[[Path], object], error: Type[SafetyDPOError] = SafetyDPOError,
                 what: str = "file", advice: str = FREE_SPACE) -> Path:
    """Write ``path`` atomically: ``write(temp)`` fills a temp file beside it, then fsync, chmod, rename.

    Disk errors (``OSError``, safetensors' ``SafetensorError``) become ``error`` naming the file and saying
    what to do; any other exception passes through. Either way the old file is intact and the temp file gone.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as failure:
        raise error(f"{path}: could not write the {what} ({_reason(failure)}); {advice}") from None
    try:
        write(Path(temp))
        _fsync(temp)
        os.chmod(temp, file_mode())
        os.replace(temp, path)
    except _write_errors() as failure:
        raise error(f"{path}: could not write the {what} ({_reason(failure)}); {advice}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return path


def write_bytes(path, data: bytes, **options) -> Path:
    """``data`` to ``path`` atomically (``options``: ``error``, ``what``, ``advice`` of ``atomic_write``)."""
    return atomic_write(path, lambda temp: temp.write_bytes(data), **options)


def write_text(path, text: str, **options) -> Path:
    """UTF-8 ``text`` to ``path`` atomically, line endings exactly as given (CSV writers' ``\\r\\n`` too)."""
    return write_bytes(path, text.encode("utf-8"), **options)


def write_json(path, data, indent: Optional[int] = 1, default=None, **options) -> Path:
    """``data`` as UTF-8 JSON (non-ASCII kept as is) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=default), **options)


def save_safetensors(path, tensors: Dict[str, object], metadata: Optional[Dict[str, str]] = None,
                     **options) -> Path:
    """Tensors (made contiguous) and string metadata as a safetensors file, atomically."""
    import safetensors.torch  # looked up at call time: tests replace save_file to simulate a full disk

    contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
    return atomic_write(path, lambda temp: safetensors.torch.save_file(contiguous, str(temp), metadata=metadata),
                        **options)


def save_png(path, image, error: Type[SafetyDPOError] = SafetyDPOError, what: str = "image",
             advice: str = FREE_SPACE, **save_options) -> Path:
    """A PIL image, a uint8 [H, W, 3] array, or a matplotlib figure as a PNG file, atomically.

    ``save_options`` go to ``Figure.savefig`` (``dpi=80, bbox_inches="tight"`` …) or ``PIL.Image.save``.
    """
    if hasattr(image, "savefig"):
        return atomic_write(path, lambda temp: image.savefig(temp, format="png", **save_options), error, what, advice)
    if not hasattr(image, "save"):
        import numpy as np
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(image))
    return atomic_write(path, lambda temp: image.save(temp, format="PNG", **save_options), error, what, advice)


@contextlib.contextmanager
def atomic_folder(path, error: Type[SafetyDPOError] = SafetyDPOError, what: str = "folder",
                  advice: str = FREE_SPACE) -> Iterator[Path]:
    """A folder written whole: fill the yielded temp folder; on success its files are fsynced and get
    ``file_mode()``, its folders ``folder_mode()``, and it replaces ``path`` (an old folder there is removed
    first). On failure nothing of the temp folder remains and an existing ``path`` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as failure:
        raise error(f"{path}: could not write the {what} ({_reason(failure)}); {advice}") from None
    try:
        yield temp
        for entry in temp.rglob("*"):  # safetensors' save_file creates 0600 files whatever the umask
            if entry.is_file():
                _fsync(entry)
                os.chmod(entry, file_mode())
            elif entry.is_dir():
                os.chmod(entry, folder_mode())
        os.chmod(temp, folder_mode())
        aside = None
        if path.exists():  # renamed aside, not deleted in place: a crash mid-delete left a half folder
            aside = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, aside)
        os.replace(temp, path)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except _write_errors() as failure:
        raise error(f"{path}: could not write the {what} ({_reason(failure)}); {advice}") from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


# -- reading -----------------------------------------------------------------------------------

def check_safetensors(path, error: Type[SafetyDPOError] = LoraFormatError) -> Path:
    """Refuse what is not a safetensors file before opening it: missing, empty, pickle, truncated header."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file; check the path")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{path}: the file is empty (an interrupted download or copy?); copy it again")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise error(
            f"{path}: this is a pickle (.ckpt/.pt/.bin) file, which can run code when loaded and is never "
            "opened here. Convert it to .safetensors with a trusted tool and use that file."
        )
    if size < 8 or int.from_bytes(head, "little") > size - 8:
        raise error(f"{path}: not a safetensors file or truncated (header longer than the file); "
                    "copy or download it again")
    return path


def read_safetensors(path, error: Type[SafetyDPOError] = LoraFormatError
                     ) -> Tuple[Dict[str, "torch.Tensor"], Dict[str, str]]:  # noqa: F821
    """Tensors and metadata of a safetensors file; anything else (corrupt, truncated, pickle, empty, no
    tensors) raises ``error`` naming the file and what to do."""
    from safetensors import SafetensorError, safe_open

    path = check_safetensors(path, error)
    try:
        tensors = {}
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as failure:
        raise error(f"{path}: corrupt or truncated safetensors file ({failure}); copy or download it again") from None
    if not tensors:
        raise error(f"{path}: the file holds no tensors")
    return tensors, metadata


def safetensors_keys(path, error: Type[SafetyDPOError] = LoraFormatError) -> list:
    """The tensor names of a safetensors file, read from its header only (for lazy reading)."""
    from safetensors import SafetensorError, safe_open

    path = check_safetensors(path, error)
    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as failure:
        raise error(f"{path}: not a readable safetensors file ({failure}); copy or download it again") from None


# -- hashing -----------------------------------------------------------------------------------

def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
