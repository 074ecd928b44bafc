"""Expert files through ComfyUI's own LoRA loader: zero dropped keys, patched weights = base + ΔW.

Needs COMFYUI_PATH (skips otherwise). Experts target modules that exist in the harness's small
test models (taken from the loaded model's state dict): attention projections, a 3×3 resnet conv
(conv LoRA), a full ``diff``, and for SD1.5 the CLIP text encoder through kohya ``lora_te_`` keys.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from comfyui_safetydpo import lora_files, unet_keys
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

ATTENTION = tuple(f".{a}.to_{p}.weight" for a in ("attn1", "attn2") for p in ("q", "k", "v", "out.0"))
CLIP_PREFIX = "clip_l.transformer."


@pytest.fixture(scope="module")
def sd15(comfy_inprocess, sd15_checkpoint):
    model, clip, _ = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    return model, clip


@pytest.fixture(scope="module")
def sdxl(comfy_inprocess, sdxl_checkpoint):
    return comfy_inprocess.load_diffusion_model(sdxl_checkpoint)


def random_lora(generator, weight, rank, alpha):
    out_features, in_features, *kernel = weight.shape
    down = torch.randn(rank, in_features, *kernel, generator=generator) * 0.1
    up = torch.randn(out_features, rank, *([1, 1] if kernel else []), generator=generator) * 0.1
    return LoraModule(down, up, alpha)


def expert_for(model_patcher, architecture, clip=None, rank=4, alpha=2.0, seed=0, blocks=None):
    """A random expert on the attention projections of a ComfyUI model (of transformer ``blocks``,
    default all), one conv LoRA, one diff, and (with ``clip``) the q/v projections and fc1 of the first
    and last CLIP layers; plus the model's layout. (Every weight name is checked against ComfyUI's key map in
    test_unet_keys; here the point is loading and exact values.)"""
    state = model_patcher.model.state_dict()
    unet_state = [k for k in state if k.startswith("diffusion_model.")]
    layout = unet_keys.infer_layout_from_ldm_keys(unet_state)
    generator = torch.Generator().manual_seed(seed)
    modules, diffs = {}, {}
    for key in unet_state:
        block = re.search(r"\.transformer_blocks\.(\d+)\.", key)
        if blocks is not None and block and int(block.group(1)) not in blocks:
            continue
        if key.endswith(ATTENTION) or key.endswith("input_blocks.1.0.in_layers.2.weight"):
            canonical = unet_keys.native_to_canonical(key[: -len(".weight")], layout)
            modules[canonical] = random_lora(generator, state[key], rank, alpha)
    diff_key = "diffusion_model.input_blocks.1.0.out_layers.3.weight"
    diffs[unet_keys.native_to_canonical(diff_key[: -len(".weight")], layout)] = \
        torch.randn(state[diff_key].shape, generator=generator) * 0.01
    if clip is not None:
        for key, weight in clip.cond_stage_model.state_dict().items():
            if key.startswith(CLIP_PREFIX + "text_model.encoder.layers.") and key.endswith(
                    ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.fc1.weight")) and (
                    ".layers.0." in key or ".layers.11." in key):
                canonical = "text_encoder." + key[len(CLIP_PREFIX): -len(".weight")]
                modules[canonical] = random_lora(generator, weight, rank, 3.0)
    assert any(m.down.dim() == 4 for m in modules.values())
    expert = SafetyExpert("test", modules, diffs, architecture=architecture, categories=["Hate"])
    return expert, layout


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_through_comfyui(comfy, model, path, clip=None):
    """ComfyUI's load_lora on the model's (and clip's) key map: (file tensors, patches, dropped keys)."""
    tensors, _ = lora_files.read_safetensors(path)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        patches = comfy.lora.load_lora(tensors, key_map)
    finally:
        logging.getLogger().removeHandler(capture)
    dropped = [m.split(": ", 1)[1] for m in capture.messages if "lora key not loaded" in m]
    return tensors, patches, dropped


def assert_patched_weights_equal_base_plus_delta(comfy, model, clip, tensors, expert, layout):
    """Apply with load_lora_for_models and compute each patched weight the way ``patch_model`` does
    (``ModelPatcher.patch_weight_to_device``), without touching the input model."""
    patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)
    unet_state = model.model.state_dict()
    clip_state = clip.cond_stage_model.state_dict() if clip is not None else {}
    for module in expert.module_names:
        if module.startswith("unet."):
            key = unet_keys.canonical_to_native(module, layout) + ".weight"
            before, patcher = unet_state[key], patched_model
        else:
            key = CLIP_PREFIX + module[len("text_encoder."):] + ".weight"
            before, patcher = clip_state[key], patched_clip.patcher
        after = patcher.patch_weight_to_device(key, return_weight=True)
        expected = before.float() + expert.delta_weight(module)
        # ComfyUI adds in float32 and stores in the weight's dtype (fp16 for CLIP here): allow its rounding.
        rtol = 0.0 if before.dtype == torch.float32 else torch.finfo(before.dtype).eps
        assert after.dtype == before.dtype, key
        assert torch.allclose(after.float(), expected, atol=1e-5, rtol=rtol), key
        assert not torch.equal(after, before), key
    assert torch.equal(model.model.state_dict()[key] if key in unet_state else clip.cond_stage_model.state_dict()[key],
                       before)  # the input model is untouched


@pytest.mark.parametrize("key_format", ["kohya", "native"])
def test_sd15_expert_has_zero_dropped_keys_and_exact_weights(comfy_inprocess, sd15, tmp_path, key_format):
    model, clip = sd15
    expert, layout = expert_for(model, "sd15", clip=clip)
    path = lora_files.save_expert(expert, tmp_path / f"e_{key_format}.safetensors", key_format=key_format,
                                  layout=layout)
    tensors, patches, dropped = load_through_comfyui(comfy_inprocess, model, path, clip)
    assert dropped == []
    assert len(patches) == len(expert.module_names)  # every module of the file became a patch
    assert len(tensors) == 3 * len(expert.modules) + len(expert.diffs)
    assert_patched_weights_equal_base_plus_delta(comfy_inprocess, model, clip, tensors, expert, layout)

    reread = lora_files.load_expert(path)
    assert reread.module_names == expert.module_names
    for module in expert.modules:
        assert torch.equal(reread.modules[module].down, expert.modules[module].down)


@pytest.mark.parametrize("key_format", ["kohya", "native"])
def test_sdxl_expert_has_zero_dropped_keys_and_exact_weights(comfy_inprocess, sdxl, tmp_path, key_format):
    expert, layout = expert_for(sdxl, "sdxl", blocks=(0, 1, 9))
    assert any(".transformer_blocks.9." in m for m in expert.modules)  # SDXL's depth-10 blocks
    path = lora_files.save_expert(expert, tmp_path / f"x_{key_format}.safetensors", key_format=key_format,
                                  layout=layout)
    tensors, patches, dropped = load_through_comfyui(comfy_inprocess, sdxl, path)
    assert dropped == [] and len(patches) == len(expert.module_names)
    assert_patched_weights_equal_base_plus_delta(comfy_inprocess, sdxl, None, tensors, expert, layout)


def diffusers_twin_of_the_test_sd15_unet():
    """A diffusers UNet with the same blocks as the harness's one-level SD1.5 test model."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(320,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8,
    )


def test_peft_files_are_dropped_by_comfyui_but_our_conversion_loads(comfy_inprocess, sd15, tmp_path):
    """DESIGN.md's finding: a diffusers/PEFT LoRA does nothing in ComfyUI (all keys dropped, no
    error); the same file read by load_expert and saved as kohya loads fully, at the trained size."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model, clip = sd15
    layout = unet_keys.infer_layout_from_ldm_keys(k for k in model.model.state_dict()
                                                  if k.startswith("diffusion_model."))
    unet = diffusers_twin_of_the_test_sd15_unet()
    assert unet_keys.infer_layout_from_diffusers_config(unet.config) == layout
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    live = {name: module.get_delta_weight("default").detach() for name, module in unet.named_modules()
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})}
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "peft"), unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    peft_file = next((tmp_path / "peft").glob("*.safetensors"))

    tensors, patches, dropped = load_through_comfyui(comfy_inprocess, model, peft_file)
    assert len(patches) == 0 and sorted(dropped) == sorted(tensors)  # every key dropped, silently

    converted = lora_files.load_expert(peft_file)
    assert converted.architecture == "sd15" and converted.alpha == 8.0
    path = lora_files.save_expert(converted, tmp_path / "converted.safetensors", layout=layout)
    tensors, patches, dropped = load_through_comfyui(comfy_inprocess, model, path)
    assert dropped == [] and len(patches) == len(live)
    patched_model, _ = comfy_inprocess.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    state = model.model.state_dict()
    for name, delta in live.items():
        key = "diffusion_model." + unet_keys.diffusers_to_ldm(name, layout) + ".weight"
        after = patched_model.patch_weight_to_device(key, return_weight=True)
        assert torch.allclose(after.float(), state[key].float() + delta, atol=1e-5, rtol=0), key
