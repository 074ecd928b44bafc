"""SafetyDPO for ComfyUI: safety-expert LoRAs trained with Diffusion-DPO, merged with Co-Merge.

ComfyUI imports this folder and reads ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``.
The nodes are split by feature (experts, training, data, evaluation); each module is a thin layer
over the ``comfyui_safetydpo`` library. Outside ComfyUI (pytest imports this file as the package of
the repository root, the command-line tools never do) nothing is registered.
"""

import importlib
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_NODE_MODULES = ("nodes", "nodes_training", "nodes_data", "nodes_evaluation", "nodes_extraction")

if "comfy" in sys.modules:  # inside ComfyUI: import errors must surface, so no try/except here
    for _module_name in _NODE_MODULES:
        _module = importlib.import_module(f".{_module_name}", __name__)
        NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
