"""FID and CLIPScore (torchmetrics) with weights from local files only; nothing is downloaded."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import files
from .errors import DatasetError, MissingWeightsError


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
