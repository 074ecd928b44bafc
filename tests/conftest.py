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


# -- Offline and pickle-free guard ------------------------------------------------------------
# Every test runs with outbound network and pickle loading blocked in this process: the pack's
# main paths (training, merging, LoRA files, data, evaluation, demo) must work without either.
# Loopback stays allowed for the ComfyUI server the harness starts (a separate process).

import ipaddress  # noqa: E402
import pickle  # noqa: E402
import socket  # noqa: E402

BLOCKED_CALLS = []


def _is_local_address(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) and address else address
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: refuse without resolving it


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if not _is_local_address(address):
        BLOCKED_CALLS.append(("connect", address))
        raise ConnectionRefusedError(f"network access blocked in tests (tried {address!r}): the pack must work offline")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local_address(address):
        BLOCKED_CALLS.append(("connect_ex", address))
        raise ConnectionRefusedError(f"network access blocked in tests (tried {address!r}): the pack must work offline")
    return _real_connect_ex(self, address)


def _refuse_pickle(*args, **kwargs):
    BLOCKED_CALLS.append(("pickle", args[:1]))
    raise AssertionError("a pickle load was attempted: the pack must load only safetensors/JSON")


@pytest.fixture(autouse=True, scope="session")
def offline_and_pickle_free():
    import torch

    saved = (socket.socket.connect, socket.socket.connect_ex, torch.load, pickle.load)
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    torch.load = _refuse_pickle
    pickle.load = _refuse_pickle
    try:
        yield BLOCKED_CALLS
    finally:
        socket.socket.connect, socket.socket.connect_ex, torch.load, pickle.load = saved


def pytest_terminal_summary(terminalreporter):
    if BLOCKED_CALLS:
        terminalreporter.write_line(f"offline guard blocked {len(BLOCKED_CALLS)} call(s): {BLOCKED_CALLS[:5]}")


def pytest_sessionfinish(session, exitstatus):
    """Any blocked network or pickle call anywhere in the suite fails the run."""
    if BLOCKED_CALLS and exitstatus == 0:
        session.exitstatus = 1


# Tiny models run much faster on one thread than on two contended ones (measured ~20x on the
# shared 2-core machine); ComfyUI servers started by the harness are separate processes.
import torch as _torch  # noqa: E402

_torch.set_num_threads(1)
