"""diffusers ↔ LDM ↔ kohya module names for SD1.5, SD2.1, SDXL and small test layouts."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from comfyui_safetydpo import unet_keys

SD15_CONFIG = dict(cross_attention_dim=768, attention_head_dim=8)
SD21_CONFIG = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL_CONFIG = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def diffusers_module_names(config):
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    layout = unet_keys.infer_layout_from_diffusers_config(unet.config)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return names, layout


@pytest.mark.parametrize("architecture,config", [("sd15", SD15_CONFIG), ("sd21", SD21_CONFIG), ("sdxl", SDXL_CONFIG)])
def test_every_weight_module_round_trips_through_ldm_names(architecture, config):
    names, layout = diffusers_module_names(config)
    assert layout == unet_keys.LAYOUTS[architecture]
    ldm = [unet_keys.diffusers_to_ldm(n, layout) for n in names]
    assert len(set(ldm)) == len(names), "two diffusers modules mapped to one LDM name"
    assert [unet_keys.ldm_to_diffusers(n, layout) for n in ldm] == names


def test_known_sd15_and_sdxl_names():
    sd15, sdxl = unet_keys.LAYOUTS["sd15"], unet_keys.LAYOUTS["sdxl"]
    assert unet_keys.diffusers_to_ldm("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", sd15) == \
        "input_blocks.2.1.transformer_blocks.0.attn1.to_q"
    assert unet_keys.diffusers_to_ldm("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0", sd15) == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"
    assert unet_keys.diffusers_to_ldm("mid_block.attentions.0.proj_in", sd15) == "middle_block.1.proj_in"
    assert unet_keys.diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", sd15) == "output_blocks.2.1.conv"
    assert unet_keys.diffusers_to_ldm("up_blocks.1.upsamplers.0.conv", sd15) == "output_blocks.5.2.conv"
    assert unet_keys.diffusers_to_ldm("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", sdxl) == \
        "input_blocks.8.1.transformer_blocks.9.ff.net.2"


def test_layout_inferred_from_ldm_keys_matches_preset():
    names, layout = diffusers_module_names(SDXL_CONFIG)
    keys = [f"diffusion_model.{unet_keys.diffusers_to_ldm(n, layout)}.weight" for n in names]
    assert unet_keys.infer_layout_from_ldm_keys(keys) == unet_keys.LAYOUTS["sdxl"]


def test_kohya_names_round_trip_for_unet_and_text_encoders():
    names, _ = diffusers_module_names(SD15_CONFIG)
    for name in names:
        canonical = f"unet.{name}"
        assert unet_keys.kohya_to_canonical(unet_keys.canonical_to_kohya(canonical)) == canonical
    config = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text_names = [n for n, m in CLIPTextModel(config).named_modules() if isinstance(m, torch.nn.Linear)]
    for part, arch in (("text_encoder", "sd15"), ("text_encoder", "sdxl"), ("text_encoder_2", "sdxl")):
        for name in text_names:
            canonical = f"{part}.{name}"
            kohya = unet_keys.canonical_to_kohya(canonical, arch)
            assert kohya.startswith({"sd15": "lora_te_", "sdxl": "lora_te1_" if part == "text_encoder" else "lora_te2_"}[arch])
            assert unet_keys.kohya_to_canonical(kohya) == canonical


def test_kohya_ldm_style_names_need_and_use_the_layout():
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    with pytest.raises(Exception, match="layout"):
        unet_keys.kohya_to_canonical(name)
    assert unet_keys.kohya_to_canonical(name, unet_keys.LAYOUTS["sd15"]) == \
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_mapping_agrees_with_comfyui_unet_to_diffusers(comfy_inprocess):
    """ComfyUI's own table (comfy.utils.unet_to_diffusers) gives the same names for every weight."""
    configs = {
        "sd15": {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                 "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1, "model_channels": 320},
        "sdxl": {"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
                 "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
                 "model_channels": 320},
    }
    for architecture, config in configs.items():
        layout = unet_keys.LAYOUTS[architecture]
        table = comfy_inprocess.utils.unet_to_diffusers(config)
        assert len(table) > 500
        for diffusers_key, ldm_key in table.items():
            module, ldm_module = diffusers_key.rsplit(".", 1)[0], ldm_key.rsplit(".", 1)[0]
            assert unet_keys.diffusers_to_ldm(module, layout) == ldm_module, diffusers_key
            if not module.startswith("class_embedding"):
                assert unet_keys.ldm_to_diffusers(ldm_module, layout) == module, ldm_key
