"""Interop rows of the README table that need diffusers / peft loaders (no ComfyUI): diffusers'
``load_lora_weights`` reads the pack's kohya export (per-module rank and alpha, UNet and text encoder)
to the expert's ΔW, and a PEFT adapter folder written by the pack loads with ``PeftModel.from_pretrained``
and reads back exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_safetydpo import lora_files
from comfyui_safetydpo.unet_keys import normalize_text_encoder_path
from comfyui_safetydpo.errors import LoraFormatError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

from test_lora_files import tiny_sd15_shaped_unet


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16))


def expert_on(unet, text_encoder=None, seed=3):
    """Attention LoRAs with per-module ranks and alphas (alpha ≠ rank), and CLIP self-attention.

    (diffusers 0.42 cannot read a kohya text-encoder LoRA on q_proj/v_proj without out_proj: "Could not
    automatically infer state dict type"; with all four projections it loads.)"""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            rank, alpha = (2, 5.0) if "attn2" in name else (4, 8.0)
            modules[f"unet.{name}"] = LoraModule(torch.randn(rank, module.in_features, generator=generator) * 0.1,
                                                 torch.randn(module.out_features, rank, generator=generator) * 0.1,
                                                 alpha)
    if text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if name.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")):
                modules[f"text_encoder.{normalize_text_encoder_path(name)}"] = LoraModule(
                    torch.randn(4, module.in_features, generator=generator) * 0.1,
                    torch.randn(module.out_features, 4, generator=generator) * 0.1, 3.0)
    return SafetyExpert("interop", modules, architecture="sd15", categories=["Violence"])


def live_deltas(model, prefix):
    """ΔW of every peft LoRA layer of a model, keyed by canonical name."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "active_adapters", None):
            adapter = module.active_adapters[0]
            if adapter in getattr(module, "lora_A", {}):
                path = name.replace("base_model.model.", "")
                path = normalize_text_encoder_path(path) if prefix != "unet" else path
                deltas[f"{prefix}.{path}"] = module.get_delta_weight(adapter).detach()
    return deltas


def assert_same_deltas(expert, deltas):
    """Every ΔW in ``deltas`` (a model part's LoRA layers) equals the expert's, and none is missing."""
    assert sorted(deltas) == sorted(n for n in expert.module_names
                                    if n.split(".")[0] in {k.split(".")[0] for k in deltas})
    for name, delta in deltas.items():
        expected = expert.delta_weight(name)
        assert torch.allclose(delta, expected, atol=1e-6, rtol=1e-5), (name, float((delta - expected).abs().max()))


def test_diffusers_load_lora_weights_reads_our_kohya_file_with_every_alpha(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    unet, text_encoder = tiny_sd15_shaped_unet(), tiny_text_encoder()
    unet = unet.__class__.from_config({**unet.config, "cross_attention_dim": 32})
    expert = expert_on(unet, text_encoder)
    # kohya keys (the default); one alpha for all modules, as Save Safety LoRA and Extract write it
    path = lora_files.save_expert(expert, tmp_path / "ours.safetensors", uniform_alpha=True)
    tensors, metadata = lora_files.read_safetensors(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 1 and len({v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")}) == 2
    assert_same_deltas(expert, lora_files.load_expert(path).delta_weights())  # ComfyUI's reading: same ΔW

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                       scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.load_lora_weights(str(path), adapter_name="safety")
    unet_deltas, text_deltas = live_deltas(pipeline.unet, "unet"), live_deltas(pipeline.text_encoder, "text_encoder")
    assert len(unet_deltas) == len([m for m in expert.modules if m.startswith("unet.")])
    assert_same_deltas(expert, unet_deltas)
    assert len(text_deltas) == 8
    assert_same_deltas(expert, text_deltas)


def test_peft_folder_export_loads_in_peft_and_reads_back_exactly(tmp_path):
    from peft import PeftModel

    unet = tiny_sd15_shaped_unet()
    expert = expert_on(unet)
    folder = lora_files.save_peft_folder(expert, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    model = PeftModel.from_pretrained(unet, str(folder))
    deltas = live_deltas(model, "unet")
    assert len(deltas) == len(expert.modules)
    assert_same_deltas(expert, deltas)
    again = lora_files.load_expert(folder)  # a folder is read as a PEFT adapter folder
    assert again.categories == ["Violence"]
    for name, module in expert.modules.items():
        assert torch.equal(again.modules[name].down, module.down) and again.modules[name].alpha == module.alpha
    with pytest.raises(LoraFormatError, match="no text_encoder modules"):
        lora_files.save_peft_folder(expert, tmp_path / "te", part="text_encoder")
    with pytest.raises(LoraFormatError, match="no adapter_model.safetensors"):
        lora_files.load_expert(tmp_path)


def test_uniform_alpha_keeps_every_delta():
    unet = tiny_sd15_shaped_unet()
    expert = expert_on(unet, tiny_text_encoder())
    uniform = lora_files.with_uniform_alpha(expert)
    assert len({m.alpha for m in expert.modules.values()}) == 3 and {m.alpha for m in uniform.modules.values()} == {8.0}
    for name in expert.modules:
        assert torch.allclose(uniform.delta_weight(name), expert.delta_weight(name), rtol=1e-6, atol=1e-8), name
    assert lora_files.with_uniform_alpha(uniform) is uniform
