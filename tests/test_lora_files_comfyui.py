"""Expert files through ComfyUI's own LoRA loader: zero dropped keys, patched weights = base + ΔW."""

from __future__ import annotations

import logging

import pytest
import torch

from comfyui_safetydpo import lora_files, unet_keys
from comfyui_safetydpo.expert import LoraModule, SafetyExpert


def attention_expert_for(model_patcher, architecture, rank=4, alpha=2.0, seed=0):
    """A random expert on every attention projection of a ComfyUI model, with its layout."""
    state = model_patcher.model.state_dict()
    layout = unet_keys.infer_layout_from_ldm_keys([k for k in state if k.startswith("diffusion_model.")])
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key, weight in state.items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and any(
                f".{a}.to_{p}" in key for a in ("attn1", "attn2") for p in ("q", "k", "v", "out.0")):
            native = key[: -len(".weight")]
            out_features, in_features = weight.shape
            modules[unet_keys.native_to_canonical(native, layout)] = LoraModule(
                torch.randn(rank, in_features, generator=generator) * 0.1,
                torch.randn(out_features, rank, generator=generator) * 0.1, alpha)
    assert modules
    return SafetyExpert("test", modules, architecture=architecture, categories=["Hate"]), layout


class LoraLogCapture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_through_comfyui(comfy, model, path):
    tensors, _ = lora_files.read_safetensors(path)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    capture = LoraLogCapture()
    logging.getLogger().addHandler(capture)
    try:
        patches = comfy.lora.load_lora(tensors, key_map)
    finally:
        logging.getLogger().removeHandler(capture)
    dropped = [m for m in capture.messages if "lora key not loaded" in m]
    return tensors, patches, dropped


@pytest.mark.parametrize("key_format", ["kohya", "native"])
def test_sd15_expert_has_zero_dropped_keys_and_exact_weights(comfy_inprocess, sd15_checkpoint, tmp_path, key_format):
    model, _, _ = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    expert, layout = attention_expert_for(model, "sd15")
    path = lora_files.save_expert(expert, tmp_path / f"e_{key_format}.safetensors", key_format=key_format, layout=layout)
    tensors, patches, dropped = load_through_comfyui(comfy_inprocess, model, path)
    assert dropped == []
    assert len(patches) == len(expert.modules)  # every module of the file became a patch

    base = {k: v.float().clone() for k, v in model.model.state_dict().items()}
    patched_model, _ = comfy_inprocess.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    patched_model.patch_model()
    try:
        patched = patched_model.model.state_dict()
        for module in expert.modules:
            key = unet_keys.canonical_to_native(module, layout) + ".weight"
            expected = base[key] + expert.delta_weight(module)
            assert torch.allclose(patched[key].float(), expected, atol=1e-5, rtol=1e-3), key
    finally:
        patched_model.unpatch_model()
    assert torch.equal(model.model.state_dict()[key].float(), base[key])  # the input model is untouched

    reread = lora_files.load_expert(path)
    for module in expert.modules:
        assert torch.equal(reread.modules[module].down, expert.modules[module].down)


def test_sdxl_expert_has_zero_dropped_keys(comfy_inprocess, sdxl_checkpoint, tmp_path):
    model = comfy_inprocess.load_diffusion_model(sdxl_checkpoint)
    expert, layout = attention_expert_for(model, "sdxl")
    path = lora_files.save_expert(expert, tmp_path / "x.safetensors", layout=layout)
    _, patches, dropped = load_through_comfyui(comfy_inprocess, model, path)
    assert dropped == [] and len(patches) == len(expert.modules)


def test_peft_keys_are_dropped_by_comfyui_but_our_export_loads(comfy_inprocess, sd15_checkpoint, tmp_path):
    """DESIGN.md's finding: PEFT-keyed files do nothing in ComfyUI; converting them fixes it."""
    from safetensors.torch import save_file

    model, _, _ = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    expert, layout = attention_expert_for(model, "sd15")
    peft = {}
    for module, lora in expert.modules.items():
        name = "base_model.model." + module[len("unet."):]
        peft[f"{name}.lora_A.weight"] = lora.down.contiguous()
        peft[f"{name}.lora_B.weight"] = lora.up.contiguous()
    save_file(peft, str(tmp_path / "peft.safetensors"))
    _, patches, dropped = load_through_comfyui(comfy_inprocess, model, tmp_path / "peft.safetensors")
    assert len(patches) == 0 and len(dropped) == len(peft)
    converted = lora_files.load_expert(tmp_path / "peft.safetensors", architecture="sd15", layout=layout)
    path = lora_files.save_expert(converted, tmp_path / "converted.safetensors", layout=layout)
    _, patches, dropped = load_through_comfyui(comfy_inprocess, model, path)
    assert dropped == [] and len(patches) == len(expert.modules)
