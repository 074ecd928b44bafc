"""How the pack is put together: ComfyUI is touched from one module, node files import one way, and
ComfyUI finds the V3 nodes through ``comfy_entrypoint``."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import comfyui_harness as harness
from test_comfyui_harness import EXPECTED_NODES

REPO_ROOT = Path(__file__).resolve().parents[1]
BRIDGE = "comfyui_bridge.py"
COMFY_MODULES = ("comfy", "folder_paths", "server", "nodes", "execution", "comfy_execution")


def _imports(path: Path):
    """(module, level) of every import statement in a file, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def test_only_the_bridge_imports_comfyui():
    """Node files use comfy_api's schema only; the library never imports ComfyUI at all."""
    files = [*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "comfyui_safetydpo").glob("*.py")]
    offenders = [f"{path.relative_to(REPO_ROOT)}: {module}" for path in files if path.name != BRIDGE
                 for module, level in _imports(path) if level == 0 and module.split(".")[0] in COMFY_MODULES]
    assert not offenders, offenders
    library = [f"{path.name}: {module}" for path in (REPO_ROOT / "comfyui_safetydpo").glob("*.py")
               for module, level in _imports(path) if level == 0 and module.split(".")[0] == "comfy_api"]
    assert not library, library


def test_node_files_import_the_pack_relatively():
    """One import style: the pack's own modules and its library as ``from .x import``, as ComfyUI loads them."""
    for path in [*REPO_ROOT.glob("nodes*.py"), REPO_ROOT / BRIDGE, REPO_ROOT / "__init__.py"]:
        absolute = [module for module, level in _imports(path)
                    if level == 0 and module.split(".")[0] in ("comfyui_safetydpo", "nodes_training", "nodes_data",
                                                               "nodes_evaluation", "nodes_extraction",
                                                               "comfyui_bridge")]
        assert not absolute, f"{path.name} imports {absolute} absolutely"
        assert "importlib" not in path.read_text(), f"{path.name} loads a module by path"


def test_the_pack_registers_v3_nodes_through_comfy_entrypoint(comfy_inprocess):
    from comfy_api.latest import ComfyExtension, io

    package = harness.import_plugin(comfy_inprocess.root)
    assert not hasattr(package, "NODE_CLASS_MAPPINGS"), "ComfyUI prefers V1 mappings over comfy_entrypoint"
    extension = asyncio.run(package.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    assert all(isinstance(n, type) and issubclass(n, io.ComfyNode) for n in nodes)
    assert {n.GET_SCHEMA().node_id for n in nodes} == EXPECTED_NODES | {"SafetyDPOExtractExpert"}
