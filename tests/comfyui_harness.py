"""Harness for integration tests against the real ComfyUI (``COMFYUI_PATH``).

- ``build_sd15_checkpoint`` / ``build_sdxl_unet``: small, randomly initialised models written at test
  time that ComfyUI's own detection recognises as SD1.5 (a full checkpoint: UNet + CLIP-L + a
  TAESD-sized VAE) and as SDXL (a UNet-only file for ``models/diffusion_models``). They are built
  with ComfyUI's own module classes, so the key layout is exactly what its loader expects.
- ``ComfyUIServer``: starts ``main.py --cpu`` on a free port with ``--base-directory`` in a temp
  folder (this repository linked into its ``custom_nodes/``), runs API-format workflows through
  POST /prompt, reads /history, and always stops the process.

Nothing here is committed as weights; built files are cached under ``.cache/comfyui_test_models``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR_NAME = "safetydpo"
MODEL_CACHE = REPO_ROOT / ".cache" / "comfyui_test_models"
BUILDER_VERSION = "2"

SD15_CHECKPOINT_NAME = "safetydpo_test_sd15.safetensors"
SDXL_UNET_NAME = "safetydpo_test_sdxl_unet.safetensors"

# One level, model_channels 320, context 768: ComfyUI detects SD1.5 (see DESIGN.md).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "use_temporal_attention": False, "use_temporal_resblock": False,
}

# SDXL's detection keys (model_channels 320, linear transformers, input transformer depth
# [0, 0, 2, 2, 10, 10], context 2048, adm 2816) at constant width 320 and without output or middle
# transformers, to stay small.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 0, 0, 0, 0, 0, 0], "channel_mult": [1, 1, 1],
    "transformer_depth_middle": -1, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def comfyui_path() -> Optional[Path]:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).resolve()
    return path if (path / "main.py").is_file() else None


def import_comfy(path: Path) -> None:
    """Make ``comfy.*`` importable in this process (CPU, no argument parsing)."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported anywhere


PLUGIN_PACKAGE = "safetydpo_custom_node"
"""The name this process imports the repository under, as ComfyUI's custom_nodes loader does."""


class _SharedLibrary(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``<plugin>.comfyui_safetydpo[.x]`` as the tests' own ``comfyui_safetydpo[.x]``.

    In ComfyUI the node files import the library relatively, as part of the pack. In this process
    the tests import it as ``comfyui_safetydpo`` too; without this one class (an error type, an
    expert) would exist twice and ``pytest.raises`` / ``isinstance`` would miss the other copy.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def find_spec(self, name, path=None, target=None):
        if name == self.prefix or name.startswith(self.prefix + "."):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("comfyui_safetydpo" + spec.name[len(self.prefix):])

    def exec_module(self, module):
        pass


def import_plugin(comfy_root: Path):
    """The repository as ComfyUI's ``load_custom_node`` imports a custom node folder: its ``__init__.py``
    as a package (here named ``PLUGIN_PACKAGE``), so the node files' relative imports work as in ComfyUI."""
    import_comfy(comfy_root)
    if PLUGIN_PACKAGE not in sys.modules:
        sys.meta_path.insert(0, _SharedLibrary(f"{PLUGIN_PACKAGE}.comfyui_safetydpo"))
        spec = importlib.util.spec_from_file_location(PLUGIN_PACKAGE, REPO_ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PLUGIN_PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PLUGIN_PACKAGE]


def plugin_module(comfy_root: Path, name: str):
    """One module of the pack (``nodes``, ``nodes_training``, ``comfyui_bridge``, ...) imported as in ComfyUI."""
    import_plugin(comfy_root)
    return importlib.import_module(f"{PLUGIN_PACKAGE}.{name}")


def _randomise(module, seed: int) -> None:
    """Deterministic small random weights (ComfyUI's ops skip initialisation on purpose)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            if parameter.dim() <= 1:
                # 1-d weights are norm scales (GroupNorm in_layers.0 / out_layers.0 / out.0 included):
                # at 0 the UNet would predict 0 everywhere and no LoRA could reach an image.
                if name.endswith("weight"):
                    parameter.fill_(1.0)
                else:
                    parameter.zero_()
                continue
            fan_in = parameter[0].numel()
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)


def _build_unet_state_dict(config: Dict, seed: int):
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    _randomise(unet, seed)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}


def _atomic_save(tensors, path: Path, metadata=None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _cached(name: str) -> Path:
    return MODEL_CACHE / f"v{BUILDER_VERSION}" / name


def _is_valid_safetensors(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return len(list(handle.keys())) > 0
    except Exception:
        return False


def build_sd15_checkpoint(comfy_root: Path) -> Path:
    """A small SD1.5-detected checkpoint (UNet + real CLIP-L shapes + TAESD VAE), cached."""
    target = _cached(SD15_CHECKPOINT_NAME)
    if target.exists() and _is_valid_safetensors(target):
        return target
    import_comfy(comfy_root)
    import torch
    import comfy.taesd.taesd
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {f"model.diffusion_model.{k}": v for k, v in _build_unet_state_dict(SD15_UNET_CONFIG, 0).items()}
    clip_config = json.loads((comfy_root / "comfy" / "sd1_clip_config.json").read_text())
    clip_config.pop("architectures", None)
    clip_config.pop("torch_dtype", None)
    torch.manual_seed(1)
    text_model = CLIPTextModel(CLIPTextConfig(**clip_config))
    for k, v in text_model.state_dict().items():
        state[f"cond_stage_model.transformer.{k}"] = v.detach().to(torch.float16).contiguous()
    taesd = comfy.taesd.taesd.TAESD()
    _randomise(taesd, 2)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.zero_()
    for k, v in taesd.state_dict().items():
        state[f"first_stage_model.{k}"] = v.detach().to(torch.float16).contiguous()
    _atomic_save(state, target, {"safetydpo_test_model": "sd15", "builder_version": BUILDER_VERSION})
    return target


def build_sdxl_unet(comfy_root: Path) -> Path:
    """A small UNet-only file that ComfyUI detects as SDXL (for models/diffusion_models), cached."""
    target = _cached(SDXL_UNET_NAME)
    if target.exists() and _is_valid_safetensors(target):
        return target
    import_comfy(comfy_root)
    state = _build_unet_state_dict(SDXL_UNET_CONFIG, 3)
    _atomic_save(state, target, {"safetydpo_test_model": "sdxl", "builder_version": BUILDER_VERSION})
    return target


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class WorkflowError(RuntimeError):
    """A workflow failed in ComfyUI; the message holds ComfyUI's error and the log tail."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyUIServer:
    """A real ComfyUI process on loopback with this repository installed as a custom node."""

    def __init__(self, comfy_root: Path, base_dir: Path, python: str = sys.executable):
        self.comfy_root = Path(comfy_root)
        self.base_dir = Path(base_dir)
        self.python = python
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex

    # -- layout ---------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/safety_experts",
                    "models/diffusion_models", "input", "output", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PLUGIN_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)

    def add_model(self, source: Path, folder: str, name: Optional[str] = None) -> Path:
        """Link a model file into ``models/<folder>/`` (before or while the server runs)."""
        target = self.base_dir / "models" / folder / (name or Path(source).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                target.symlink_to(Path(source).resolve())
            except OSError:
                shutil.copy2(source, target)
        return target

    # -- process --------------------------------------------------------------------------
    def start(self,
              timeout: float = float(os.environ.get("SAFETYDPO_COMFYUI_START_TIMEOUT", "300"))) -> "ComfyUIServer":
        self.prepare()
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        command = [
            self.python, "-B", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        self._log_handle = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=self.comfy_root, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise WorkflowError(f"ComfyUI exited during start-up:\n{self.log_text()[-4000:]}")
            try:
                self._get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise WorkflowError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if getattr(self, "_log_handle", None):
            self._log_handle.close()
            self._log_handle = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- HTTP -----------------------------------------------------------------------------
    def _get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return json.loads(response.read().decode() or "null")

    def _post(self, route: str, payload: Dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode() or "null")
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            raise WorkflowError(f"POST {route} -> HTTP {error.code}: {body}") from None

    def object_info(self) -> Dict:
        return self._get("/object_info", timeout=60)

    def queue(self, graph: Dict) -> str:
        """Queue an API-format graph; returns the prompt id."""
        answer = self._post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise WorkflowError(f"ComfyUI rejected the workflow: {json.dumps(answer['node_errors'])[:4000]}")
        return answer["prompt_id"]

    def interrupt(self) -> None:
        self._post("/interrupt", {})

    def wait(self, prompt_id: str, timeout: float = 300.0) -> Dict:
        """Wait for a queued prompt; returns its history entry (raises WorkflowError on failure)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self._get(f"/history/{prompt_id}")
            if history and prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("completed", False) or status.get("status_str") == "success":
                    return entry
                if status.get("status_str") == "error":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise WorkflowError(
                        f"workflow failed: {json.dumps(messages)[:6000]}\n--- log tail ---\n{self.log_text()[-3000:]}"
                    )
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise WorkflowError(f"ComfyUI died while running the workflow:\n{self.log_text()[-4000:]}")
            time.sleep(0.25)
        raise WorkflowError(f"workflow {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def run_workflow(self, graph: Dict, timeout: float = 300.0) -> Dict:
        """Run an API-format graph to the end; returns ``{node_id: outputs}`` (raises on error)."""
        return self.wait(self.queue(graph), timeout).get("outputs", {})

    def output_images(self, outputs: Dict, node_id: str):
        """The image files a SaveImage/PreviewImage node wrote, as paths."""
        paths = []
        for image in outputs.get(str(node_id), {}).get("images", []):
            folder = {"output": "output", "temp": "temp"}.get(image.get("type", "output"), "output")
            root = self.base_dir / folder
            paths.append(root / image.get("subfolder", "") / image["filename"])
        return paths


def load_workflow(name: str) -> Dict:
    """An API-format graph from ``workflows/`` (a fresh copy each time)."""
    return json.loads((REPO_ROOT / "workflows" / name).read_text())
