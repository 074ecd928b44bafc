"""The real ComfyUI starts with the extension, lists every node, and runs txt2img on the test model."""

from __future__ import annotations

import numpy as np
from PIL import Image

import comfyui_harness as harness


def test_test_checkpoints_are_detected_as_sd15_and_sdxl(comfy_inprocess, sd15_checkpoint, sdxl_checkpoint):
    model, clip, vae = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    assert type(model.model.model_config).__name__ == "SD15"
    assert clip is not None and vae is not None
    sdxl = comfy_inprocess.load_diffusion_model(sdxl_checkpoint)
    assert type(sdxl.model.model_config).__name__ == "SDXL"


# Every node the pack registers (kept in step with the node modules; a missing one fails the test).
EXPECTED_NODES = {
    "SafetyDPOLoadExpert", "SafetyDPOMergeExperts", "SafetyDPOComputeCoMergeStatistics",
    "SafetyDPORecordLeastSquaresStatistics", "SafetyDPOApplyExperts", "SafetyDPOApplyExpertsByPrompt",
    "SafetyDPOSaveLora", "SafetyDPOTrainExpert", "SafetyDPOBuildSafetyPairs", "SafetyDPOEvaluateSafety",
    "SafetyDPODistillExperts",
}


def test_extension_loads_and_lists_every_node(comfyui_server):
    log = comfyui_server.log_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    info = comfyui_server.object_info()
    ours = {name: node for name, node in info.items() if "safetydpo" in str(node.get("python_module", ""))}
    missing = sorted(EXPECTED_NODES - set(ours))
    assert not missing, f"nodes not listed by /object_info: {missing}\n{log[-3000:]}"
    for name, node in ours.items():
        assert node["category"].startswith("safetydpo"), name
        assert node.get("description"), f"{name} has no description"
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_txt2img_on_the_test_checkpoint_returns_an_image(comfyui_server):
    graph = harness.load_workflow("txt2img_api.json")
    outputs = comfyui_server.run_workflow(graph, timeout=180)
    paths = comfyui_server.output_images(outputs, "7")
    assert len(paths) == 1 and paths[0].is_file()
    image = np.asarray(Image.open(paths[0]))
    assert image.shape == (64, 64, 3)
    assert image.std() > 0, "a flat image means sampling did not run"
