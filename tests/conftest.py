"""Shared fixtures. ComfyUI fixtures skip with a clear reason when ``COMFYUI_PATH`` is unset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SKIP_REASON = (
    "COMFYUI_PATH is not set (or has no main.py): set it to a ComfyUI 0.33.0 checkout whose "
    "requirements are installed in this Python (.ci/run does this with ../shared/vendor/ComfyUI)"
)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = harness.comfyui_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def sd15_checkpoint(comfyui_path) -> Path:
    """A small random checkpoint that ComfyUI detects as SD1.5 (cached across runs)."""
    return harness.build_sd15_checkpoint(comfyui_path)


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfyui_path) -> Path:
    """A small random UNet-only file that ComfyUI detects as SDXL (load with load_diffusion_model)."""
    return harness.build_sdxl_unet(comfyui_path)


class ComfyInProcess:
    """In-process access to ComfyUI's own loaders (``comfy.*`` importable after construction)."""

    def __init__(self, root: Path):
        harness.import_comfy(root)
        import comfy.lora
        import comfy.sd
        import comfy.utils

        self.root = root
        self.sd = comfy.sd
        self.lora = comfy.lora
        self.utils = comfy.utils

    def load_checkpoint(self, path):
        """(ModelPatcher, CLIP, VAE) through ComfyUI's checkpoint loader."""
        model, clip, vae = self.sd.load_checkpoint_guess_config(str(path))[:3]
        return model, clip, vae

    def load_diffusion_model(self, path):
        """ModelPatcher of a UNet-only file through ComfyUI's diffusion-model loader."""
        return self.sd.load_diffusion_model(str(path))


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui_path) -> ComfyInProcess:
    return ComfyInProcess(comfyui_path)


@pytest.fixture(scope="session")
def comfyui_server(comfyui_path, sd15_checkpoint, sdxl_checkpoint, tmp_path_factory):
    """One real ComfyUI server for the whole session, with the test models installed."""
    base = tmp_path_factory.mktemp("comfyui_base")
    server = harness.ComfyUIServer(comfyui_path, base)
    server.prepare()
    server.add_model(sd15_checkpoint, "checkpoints")
    server.add_model(sdxl_checkpoint, "diffusion_models")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        log = server.log_text()
        # Keep the log next to the pytest temp folders for post-mortems.
        (base / "comfyui-final.log").write_text(log)
