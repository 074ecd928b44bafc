"""SafetyDPO for ComfyUI: safety-expert LoRAs trained with Diffusion-DPO, merged with Co-Merge.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint()`` (the V3 node schema of
``comfy_api.latest``). The nodes are split by feature (experts, training, data, evaluation,
extraction); each module is a thin layer over the ``comfyui_safetydpo`` library, and
``comfyui_bridge`` is the one module that touches ComfyUI itself. Importing this folder registers
nothing and imports no node module (the command-line tools never do); ComfyUI's call does.
"""


async def comfy_entrypoint():
    """The pack's ComfyExtension: every node of every node module, in menu order."""
    from comfy_api.latest import ComfyExtension

    from . import nodes, nodes_data, nodes_evaluation, nodes_extraction, nodes_training

    class SafetyDPOExtension(ComfyExtension):
        async def get_node_list(self):
            return [*nodes.NODES, *nodes_training.NODES, *nodes_data.NODES, *nodes_evaluation.NODES,
                    *nodes_extraction.NODES]

    return SafetyDPOExtension()


__all__ = ["comfy_entrypoint"]
