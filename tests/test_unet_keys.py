"""diffusers ↔ LDM ↔ kohya module names for SD1.5, SD2.1, SDXL and small test layouts.

Module lists come from real diffusers / transformers models built on the meta device (no weights).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from comfyui_safetydpo import unet_keys
from comfyui_safetydpo.errors import LoraFormatError

SD15_CONFIG = dict(cross_attention_dim=768, attention_head_dim=8)
SD21_CONFIG = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL_CONFIG = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SMALL = dict(norm_num_groups=8, cross_attention_dim=64, attention_head_dim=8)
ODD_CONFIGS = {
    # what ComfyUI detects as SD1.5 in the test harness: one level, 320 channels, 768 context
    "one_level": dict(block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=768),
    "uneven": dict(block_out_channels=(32, 64, 64),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                   layers_per_block=(1, 2, 3), transformer_layers_per_block=(1, 1, 3), **SMALL),
    "no_mid_block": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         mid_block_type=None, **SMALL),
}
ODD_LAYOUTS = {
    "one_level": unet_keys.UNetLayout.build(1, (1,)),
    "uneven": unet_keys.UNetLayout((1, 2, 3), (1, 0, 3), (3, 0, 1), 3),
    "no_mid_block": unet_keys.UNetLayout.build(1, (1, 0), mid_depth=0),
}


def diffusers_module_names(config):
    """Weight-carrying module names of a real diffusers UNet, and the layout read from its config."""
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    layout = unet_keys.infer_layout_from_diffusers_config(unet.config)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return names, layout


def assert_round_trip(names, layout):
    ldm = [unet_keys.diffusers_to_ldm(n, layout) for n in names]
    assert len(set(ldm)) == len(names), "two diffusers modules mapped to one LDM name"
    assert [unet_keys.ldm_to_diffusers(n, layout) for n in ldm] == names
    return ldm


@pytest.mark.parametrize("architecture,config", [("sd15", SD15_CONFIG), ("sd21", SD21_CONFIG), ("sdxl", SDXL_CONFIG)])
def test_every_weight_module_of_the_presets_round_trips_through_ldm_names(architecture, config):
    names, layout = diffusers_module_names(config)
    assert layout == unet_keys.layout_for(architecture)
    ldm = assert_round_trip(names, layout)
    assert unet_keys.infer_layout_from_ldm_keys(f"diffusion_model.{n}.weight" for n in ldm) == layout


@pytest.mark.parametrize("kind", sorted(ODD_CONFIGS))
def test_odd_layouts_are_inferred_the_same_from_config_and_from_ldm_keys(kind):
    names, layout = diffusers_module_names(ODD_CONFIGS[kind])
    assert layout == ODD_LAYOUTS[kind]
    ldm = assert_round_trip(names, layout)
    assert unet_keys.infer_layout_from_ldm_keys(f"model.diffusion_model.{n}.bias" for n in ldm) == layout
    assert unet_keys.layout_from_json(unet_keys.layout_to_json(layout)) == layout


def test_known_sd15_and_sdxl_names():
    sd15, sdxl = unet_keys.LAYOUTS["sd15"], unet_keys.LAYOUTS["sdxl"]
    expected = [
        (sd15, "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
         "input_blocks.2.1.transformer_blocks.0.attn1.to_q"),
        (sd15, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
         "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"),
        (sd15, "mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        (sd15, "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        (sd15, "down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        (sd15, "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (sd15, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        (sd15, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        (sdxl, "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
         "input_blocks.8.1.transformer_blocks.9.ff.net.2"),
        (sdxl, "add_embedding.linear_2", "label_emb.0.2"),
        (sdxl, "conv_norm_out", "out.0"),
    ]
    for layout, diffusers, ldm in expected:
        assert unet_keys.diffusers_to_ldm(diffusers, layout) == ldm
        assert unet_keys.ldm_to_diffusers(ldm, layout) == diffusers


def test_names_that_do_not_exist_in_the_layout_are_refused():
    sd15 = unet_keys.LAYOUTS["sd15"]
    for bad in ("down_blocks.3.downsamplers.0.conv", "down_blocks.3.attentions.0.proj_in",
                "up_blocks.4.resnets.0.conv1", "mid_block.attentions.1.proj_in", "encoder.layers.0"):
        with pytest.raises(LoraFormatError):
            unet_keys.diffusers_to_ldm(bad, sd15)
    for bad in ("input_blocks.12.0.in_layers.2", "output_blocks.0.1.proj_in", "middle_block.3.in_layers.0", "foo.bar"):
        with pytest.raises(LoraFormatError):
            unet_keys.ldm_to_diffusers(bad, sd15)


@pytest.mark.parametrize("config", [SD15_CONFIG, SDXL_CONFIG])
def test_kohya_names_round_trip_for_every_unet_module(config):
    names, _ = diffusers_module_names(config)
    for name in names:
        canonical = f"unet.{name}"
        assert unet_keys.kohya_to_canonical(unet_keys.canonical_to_kohya(canonical)) == canonical


def test_kohya_names_round_trip_for_text_encoders():
    config = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    with init_empty_weights():
        model = CLIPTextModelWithProjection(config)  # keeps the text_model. level in every transformers version
        bare = CLIPTextModel(config)
    text_names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert "text_model.encoder.layers.1.mlp.fc1" in text_names and "text_projection" in text_names
    prefixes = {("text_encoder", "sd15"): "lora_te_", ("text_encoder", "sdxl"): "lora_te1_",
                ("text_encoder_2", "sdxl"): "lora_te2_"}
    for (part, arch), prefix in prefixes.items():
        for name in text_names:
            canonical = f"{part}.{name}"
            kohya = unet_keys.canonical_to_kohya(canonical, arch)
            assert kohya.startswith(prefix)
            assert unet_keys.kohya_to_canonical(kohya) == canonical
    # transformers 5's CLIPTextModel has no text_model. level; both spellings give the same kohya key.
    for name, _ in bare.named_modules():
        if name:
            normalized = unet_keys.normalize_text_encoder_path(name)
            assert normalized.startswith("text_model.") and normalized in dict(model.named_modules())
            assert unet_keys.canonical_to_kohya(f"text_encoder.{name}") == \
                unet_keys.canonical_to_kohya(f"text_encoder.{normalized}")
    assert unet_keys.kohya_to_canonical("lora_te_text_model_encoder_layers_11_self_attn_out_proj") == \
        "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"
    assert unet_keys.kohya_to_canonical("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj") == \
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"


def test_kohya_ldm_style_names_need_and_use_the_layout():
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    with pytest.raises(LoraFormatError, match="layout"):
        unet_keys.kohya_to_canonical(name)
    assert unet_keys.kohya_to_canonical(name, unet_keys.LAYOUTS["sd15"]) == \
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet_keys.kohya_to_canonical("lora_unet_middle_block_2_emb_layers_1", unet_keys.LAYOUTS["sd15"]) == \
        "unet.mid_block.resnets.1.time_emb_proj"


COMFY_CONFIGS = {
    "sd15": {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
             "model_channels": 320},
    "sdxl": {"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
             "model_channels": 320},
}


@pytest.mark.parametrize("architecture", sorted(COMFY_CONFIGS))
def test_mapping_agrees_with_comfyui_unet_to_diffusers(comfy_inprocess, architecture):
    """ComfyUI's own table (comfy.utils.unet_to_diffusers) gives the same names for every weight."""
    config = COMFY_CONFIGS[architecture]
    layout = unet_keys.layout_for(architecture)
    assert unet_keys.infer_layout_from_ldm_config(config) == layout
    names, _ = diffusers_module_names({"sd15": SD15_CONFIG, "sdxl": SDXL_CONFIG}[architecture])
    table = comfy_inprocess.utils.unet_to_diffusers(config)
    checked = 0
    for diffusers_key, ldm_key in table.items():
        module, ldm_module = diffusers_key.rsplit(".", 1)[0], ldm_key.rsplit(".", 1)[0]
        if module not in names:  # ComfyUI lists a downsampler for the last level too
            continue
        assert unet_keys.diffusers_to_ldm(module, layout) == ldm_module, diffusers_key
        assert unet_keys.ldm_to_diffusers(ldm_module, layout) == module, ldm_key
        checked += 1
    assert checked > 400


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_layout_of_the_comfyui_test_models(comfy_inprocess, sd15_checkpoint, sdxl_checkpoint, which):
    """The harness's small models: layout from their keys = layout from ComfyUI's detected config,
    and every weight maps the way ComfyUI's own kohya key map says."""
    if which == "sd15":
        model = comfy_inprocess.load_checkpoint(sd15_checkpoint)[0]
    else:
        model = comfy_inprocess.load_diffusion_model(sdxl_checkpoint)
    state_keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
    layout = unet_keys.infer_layout_from_ldm_keys(state_keys)
    assert layout == unet_keys.infer_layout_from_ldm_config(model.model.model_config.unet_config)
    key_map = comfy_inprocess.lora.model_lora_keys_unet(model.model, {})
    checked = 0
    for key in state_keys:
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        canonical = unet_keys.native_to_canonical(module, layout)
        assert unet_keys.canonical_to_native(canonical, layout) == module
        assert key_map[unet_keys.canonical_to_kohya(canonical)] == key
        checked += 1
    assert checked > 20
