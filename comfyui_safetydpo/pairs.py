"""Preference pairs: for one unsafe prompt, the safe rendering (preferred) and the unsafe one (rejected).

A dataset folder holds ``manifest.json`` (prompts, categories, seeds, model, sampler settings) and the
images under ``images/``. Both images of a pair were rendered by the model being aligned with the same
seed: the rejected one from the unsafe prompt, the preferred one from its safe rewrite. Training
conditions both on the unsafe ``prompt``.

Optional replay items are the base model's own images for safe prompts, used by the preservation term
so that everything else the model draws stays as it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One unsafe prompt with its preferred (safe) and rejected (unsafe) image files."""

    pair_id: str
    prompt: str
    safe_prompt: str
    categories: Tuple[str, ...]
    preferred_image: str
    rejected_image: str
    seed: int = 0
    concept: str = ""


@dataclasses.dataclass(frozen=True)
class ReplayItem:
    """A safe prompt and the base model's own image for it (for the preservation term)."""

    item_id: str
    prompt: str
    image: str
    seed: int = 0


@dataclasses.dataclass
class PreferencePairs:
    """A dataset of preference pairs (and optional replay items) rooted at ``root``.

    Image paths inside pairs are relative to ``root``.
    """

    root: Path
    pairs: List[PreferencePair]
    replay: List[ReplayItem] = dataclasses.field(default_factory=list)
    info: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, relative: str) -> Path:
        return Path(self.root) / relative

    @property
    def categories(self) -> List[str]:
        return sorted({c for p in self.pairs for c in p.categories})

    def select(self, categories: Optional[Sequence[str]] = None) -> "PreferencePairs":
        """The pairs that carry any of ``categories`` (all pairs when None); replay is kept."""
        if categories is None:
            return self
        wanted = set(categories)
        chosen = [p for p in self.pairs if wanted & set(p.categories)]
        return dataclasses.replace(self, pairs=chosen)


def load_image_tensor(path) -> "torch.Tensor":
    """An image file as a float tensor [3, H, W] in [-1, 1] (RGB)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from .errors import DatasetError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: unreadable image ({error}); re-render this pair") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def save_image_tensor(image, path) -> None:
    """A tensor [3, H, W] in [-1, 1] as a PNG, written atomically."""
    import os
    import tempfile

    import numpy as np
    from PIL import Image

    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
