"""Reading and writing expert files: every format round-trips exactly; files written by peft and
diffusers read back to the ΔW of the live peft model; bad files fail clearly."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from shared_helpers import random_expert

from comfyui_safetydpo import lora_files, unet_keys
from comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SD15_MODULES = {  # name: (out, in) or (out, in, k, k), rank, alpha
    Q: ((320, 320), 4, 8.0),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": ((320, 768), 4, 8.0),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": ((1280, 1280), 4, 8.0),
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": ((320, 768), 2, 3.0),
    "unet.down_blocks.1.resnets.0.conv1": ((640, 320, 3, 3), 4, 1.0),  # conv LoRA
    "unet.down_blocks.0.attentions.1.proj_in": ((320, 320, 1, 1), 8, 8.0),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ((768, 768), 4, 2.0),
}


def make_expert(modules=SD15_MODULES, seed=0, architecture="sd15", name="hate"):
    return random_expert(name, modules, seed, architecture=architecture, categories=["Hate", "Harassment"],
                         metadata={"safetydpo_recipe": json.dumps({"method": "dpo", "beta": 5000})})


def assert_identical(expected: SafetyExpert, loaded: SafetyExpert):
    assert loaded.module_names == expected.module_names
    for name, module in expected.modules.items():
        assert torch.equal(loaded.modules[name].down, module.down), name
        assert torch.equal(loaded.modules[name].up, module.up), name
        assert loaded.modules[name].alpha == module.alpha, name
    for name, diff in expected.diffs.items():
        assert torch.equal(loaded.diffs[name], diff), name


@pytest.mark.parametrize("key_format", ["kohya", "native", "peft"])
def test_round_trip_is_exact_with_alpha_not_rank(tmp_path, key_format):
    expert = make_expert()
    path = lora_files.save_expert(expert, tmp_path / "e.safetensors", key_format=key_format)
    loaded = lora_files.load_expert(path)
    assert loaded.name == "hate" and loaded.architecture == "sd15" and loaded.categories == ["Hate", "Harassment"]
    assert_identical(expert, loaded)
    assert loaded.modules[Q].scale == 2.0 and loaded.rank == 8
    assert json.loads(loaded.metadata["safetydpo_recipe"]) == {"method": "dpo", "beta": 5000}
    for name in expert.module_names:
        assert torch.equal(loaded.delta_weight(name), expert.delta_weight(name))


def test_kohya_file_has_explicit_float32_alpha_and_ss_metadata(tmp_path):
    path = lora_files.save_expert(make_expert(), tmp_path / "e.safetensors")
    tensors, metadata = lora_files.read_safetensors(path)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(downs) == len(SD15_MODULES)
    for key in downs:
        alpha = tensors[key.replace(".lora_down.weight", ".alpha")]
        assert alpha.dtype == torch.float32 and alpha.dim() == 0
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(metadata["safetydpo_categories"]) == ["Hate", "Harassment"]
    assert metadata["safetydpo_architecture"] == "sd15"
    uniform = make_expert({Q: ((320, 320), 4, 2.0)})
    _, metadata = lora_files.read_safetensors(lora_files.save_expert(uniform, tmp_path / "u.safetensors"))
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"


def test_native_file_uses_ldm_names_and_kohya_text_encoder_names(tmp_path):
    path = lora_files.save_expert(make_expert(), tmp_path / "n.safetensors", key_format="native")
    tensors, _ = lora_files.read_safetensors(path)
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in tensors
    assert "diffusion_model.input_blocks.4.0.in_layers.2.lora_down.weight" in tensors  # down_blocks.1.resnets.0.conv1
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors


def test_peft_file_carries_its_alphas_in_diffusers_metadata(tmp_path):
    path = lora_files.save_expert(make_expert(), tmp_path / "p.safetensors", key_format="peft")
    tensors, metadata = lora_files.read_safetensors(path)
    assert f"{Q}.lora_A.weight" in tensors and not any(k.endswith(".alpha") for k in tensors)
    packed = json.loads(metadata["lora_adapter_metadata"])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 8.0
    assert packed["text_encoder.lora_alpha"] == 2.0
    assert not any(k.startswith("ss_") for k in metadata)


def test_sdxl_text_encoders_use_te1_te2(tmp_path):
    modules = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": ((640, 2048), 4, 8.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ((768, 768), 4, 8.0),
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": ((5120, 1280), 4, 1.0),
    }
    expert = make_expert(modules, architecture="sdxl")
    for key_format in ("kohya", "native", "peft"):
        path = lora_files.save_expert(expert, tmp_path / f"x_{key_format}.safetensors", key_format=key_format)
        tensors, metadata = lora_files.read_safetensors(path)
        if key_format != "peft":
            assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
            assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert lora_files.detect_architecture(tensors) == "sdxl"
        assert_identical(expert, lora_files.load_expert(path))
    native, _ = lora_files.read_safetensors(tmp_path / "x_native.safetensors")
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.alpha" in native


def test_diff_tensors_round_trip_and_peft_refuses_them(tmp_path):
    expert = make_expert()
    expert.diffs = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": torch.randn(320, 320),
                    Q: torch.randn(320, 320)}
    for key_format in ("kohya", "native"):
        path = lora_files.save_expert(expert, tmp_path / f"d_{key_format}.safetensors", key_format=key_format)
        loaded = lora_files.load_expert(path)
        assert_identical(expert, loaded)
        assert torch.equal(loaded.delta_weight(Q), expert.modules[Q].delta_weight() + expert.diffs[Q])
    tensors, _ = lora_files.read_safetensors(tmp_path / "d_native.safetensors")
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.diff" in tensors
    with pytest.raises(LoraFormatError, match="PEFT files cannot hold"):
        lora_files.save_expert(expert, tmp_path / "d.safetensors", key_format="peft")
    assert not (tmp_path / "d.safetensors").exists()


def test_native_file_for_a_non_preset_layout_records_it(tmp_path):
    """The one-level UNet ComfyUI detects as SD1.5: up_blocks.0 has attention there, not in SD1.5."""
    layout = unet_keys.UNetLayout.build(1, (1,))
    name = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v"
    expert = make_expert({name: ((320, 768), 4, 8.0)})
    path = lora_files.save_expert(expert, tmp_path / "one.safetensors", key_format="native", layout=layout)
    tensors, metadata = lora_files.read_safetensors(path)
    assert "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v.lora_up.weight" in tensors
    assert unet_keys.layout_from_json(metadata["safetydpo_unet_layout"]) == layout
    assert_identical(expert, lora_files.load_expert(path))
    # Without the recorded layout the SD1.5 preset applies, where that block has no attention.
    del metadata["safetydpo_unet_layout"]
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata=metadata)
    with pytest.raises(LoraFormatError, match="output_blocks.1.1.*layout"):
        lora_files.load_expert(tmp_path / "bare.safetensors")
    assert_identical(expert, lora_files.load_expert(tmp_path / "bare.safetensors", layout=layout))
    # Native keys of an unknown architecture need a layout.
    save_file(tensors, str(tmp_path / "anon.safetensors"))
    with pytest.raises(LoraFormatError, match="need the UNet layout"):
        lora_files.load_expert(tmp_path / "anon.safetensors", architecture="unknown")


def test_expert_from_state_dict_takes_live_training_tensors():
    expert = make_expert({Q: ((320, 320), 4, 8.0)})
    tensors, metadata = lora_files.expert_to_state_dict(expert)
    live = {k: v.clone().requires_grad_(v.dim() > 0) for k, v in tensors.items()}
    with torch.inference_mode():
        frozen = {k: v.detach().clone().half() for k, v in tensors.items()}
    for state in (live, frozen):
        loaded = lora_files.expert_from_state_dict(state, metadata, name="live")
        module = loaded.modules[Q]
        assert module.down.dtype == torch.float32 and not module.down.requires_grad
        assert not module.down.is_inference()
        assert torch.allclose(module.delta_weight(), expert.modules[Q].delta_weight(), rtol=2e-3, atol=1e-2)
    assert torch.equal(lora_files.expert_from_state_dict(live, metadata).modules[Q].up, expert.modules[Q].up)


# -- files written by peft and diffusers -------------------------------------------------------

def tiny_sd15_shaped_unet():
    """Two levels of 32/64 channels, SD1.5 block types and a 768-wide context (CLIP-L)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
    )


def randomise_lora_b(model):
    """peft starts B at zero; random B makes every ΔW non-zero."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def live_delta_weights(model):
    """ΔW of every LoRA layer, straight from the live peft modules (scaling included)."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name.replace("base_model.model.", "")] = module.get_delta_weight("default").detach()
    return deltas


def assert_matches_live(expert, live, scale=1.0):
    assert expert.module_names == sorted(f"unet.{name}" for name in live)
    for name, delta in live.items():
        assert torch.allclose(expert.delta_weight(f"unet.{name}"), delta * scale, rtol=0, atol=1e-7), name


def test_peft_save_pretrained_with_patterns_and_rslora_reads_back(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                        rank_pattern={"attn2.to_k": 2}, alpha_pattern={"to_v": 3.0}, use_rslora=True)
    model = get_peft_model(tiny_sd15_shaped_unet(), config)
    randomise_lora_b(model)
    live = live_delta_weights(model)
    assert any(delta.dim() == 4 for delta in live.values())  # proj_in is a 1×1 conv here
    model.save_pretrained(str(tmp_path / "adapter"))
    expert = lora_files.load_expert(tmp_path / "adapter" / "adapter_model.safetensors")
    assert expert.architecture == "sd15"
    assert_matches_live(expert, live)
    ranks = {name: m.rank for name, m in expert.modules.items()}
    assert ranks["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == 2
    # A config that belongs to another adapter is refused instead of giving wrong scales.
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 16}))
    with pytest.raises(LoraFormatError, match="r = 16"):
        lora_files.load_expert(tmp_path / "adapter" / "adapter_model.safetensors")


def test_diffusers_writers_read_back_to_the_live_delta(tmp_path, caplog):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_sd15_shaped_unet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    randomise_lora_b(unet)
    live = live_delta_weights(unet)
    state = get_peft_model_state_dict(unet)

    unet.save_lora_adapter(str(tmp_path / "model_level"))  # unprefixed keys, unprefixed metadata
    assert_matches_live(lora_files.load_expert(next((tmp_path / "model_level").glob("*.safetensors"))), live)

    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "pipeline"), unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    path = next((tmp_path / "pipeline").glob("*.safetensors"))
    assert all(k.startswith("unet.") for k in lora_files.read_safetensors(path)[0])
    assert_matches_live(lora_files.load_expert(path), live)

    # Without metadata the file has no alpha: scale 1 (alpha = rank), i.e. half the trained ΔW, and a warning.
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "bare"), unet_lora_layers=state)
    with caplog.at_level(logging.WARNING, logger="comfyui_safetydpo.lora_files"):
        bare = lora_files.load_expert(next((tmp_path / "bare").glob("*.safetensors")))
    assert "alpha = rank" in caplog.text
    assert_matches_live(bare, live, scale=0.5)
    # ... and the same file with an adapter_config.json beside it reads at full size.
    (tmp_path / "bare" / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    assert_matches_live(lora_files.load_expert(next((tmp_path / "bare").glob("*.safetensors"))), live)


def test_our_peft_export_loads_in_diffusers_with_its_alphas(tmp_path):
    unet = tiny_sd15_shaped_unet()
    generator = torch.Generator().manual_seed(3)
    modules = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0")):
            rank = 2 if "attn2" in name else 4
            modules[f"unet.{name}"] = LoraModule(torch.randn(rank, module.in_features, generator=generator),
                                                 torch.randn(module.out_features, rank, generator=generator),
                                                 5.0 if "attn2" in name else 8.0)
    expert = SafetyExpert("ours", modules, architecture="sd15")
    lora_files.save_expert(expert, tmp_path / "ours" / "ours.safetensors", key_format="peft")
    unet.load_lora_adapter(str(tmp_path / "ours"), weight_name="ours.safetensors", prefix="unet",
                           adapter_name="default")
    live = live_delta_weights(unet)
    assert_matches_live(expert, live)


# -- bad input ---------------------------------------------------------------------------------

def test_corrupt_truncated_pickle_empty_files_fail_clearly(tmp_path):
    good = lora_files.save_expert(make_expert(), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraFormatError, match="truncated.safetensors.*truncated"):
        lora_files.load_expert(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(LoraFormatError, match="garbage.safetensors"):
        lora_files.load_expert(garbage)
    bad_header = tmp_path / "bad_header.safetensors"
    bad_header.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    with pytest.raises(LoraFormatError, match="bad_header.safetensors.*corrupt"):
        lora_files.load_expert(bad_header)
    for protocol in (2, 4):
        pickled = tmp_path / f"model{protocol}.safetensors"
        pickled.write_bytes(pickle.dumps({"a": 1}, protocol=protocol))
        with pytest.raises(LoraFormatError, match="pickle.*Convert it to .safetensors"):
            lora_files.load_expert(pickled)
    zipped = tmp_path / "torch_save.ckpt"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # torch.save's zip container
    with pytest.raises(LoraFormatError, match="pickle"):
        lora_files.load_expert(zipped)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoraFormatError, match="empty"):
        lora_files.load_expert(empty)
    with pytest.raises(LoraFormatError, match="no such file"):
        lora_files.load_expert(tmp_path / "missing.safetensors")
    save_file({}, str(tmp_path / "no_tensors.safetensors"))
    with pytest.raises(LoraFormatError, match="no tensors"):
        lora_files.load_expert(tmp_path / "no_tensors.safetensors")


KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("tensors,message", [
    ({f"{KEY}.lora_down.weight": torch.full((4, 320), float("nan")), f"{KEY}.lora_up.weight": torch.ones(320, 4)},
     r"bad.safetensors.*attn1.to_q.*NaN/Inf.*down"),
    ({f"{KEY}.lora_down.weight": torch.ones(4, 320), f"{KEY}.lora_up.weight": torch.tensor([[float("inf")] * 4] * 320)},
     r"NaN/Inf.*up"),
    ({f"{KEY}.lora_down.weight": torch.ones(4, 320), f"{KEY}.lora_up.weight": torch.ones(320, 8)},
     r"mismatched LoRA shapes up \(320, 8\) / down \(4, 320\)"),
    ({f"{KEY}.lora_down.weight": torch.ones(4, 320)}, rf"{KEY}.lora_down.weight.*only one of its up/down"),
    ({f"{KEY}.lora_down.weight": torch.ones(4, 320), f"{KEY}.lora_up.weight": torch.ones(320, 4),
      f"{KEY}.alpha": torch.tensor(float("nan"))}, "non-finite alpha"),
    ({f"{KEY}.alpha": torch.tensor(4.0), "lora_unet_conv_in.lora_down.weight": torch.ones(4, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.ones(320, 4, 1, 1)}, rf"alpha without LoRA matrices: '{KEY}.alpha'"),
    ({"model.layers.0.weight": torch.ones(3, 3), "vae.encoder.conv.weight": torch.ones(3, 3), "x": torch.ones(1)},
     r"3 key\(s\) are not LoRA keys.*model.layers.0.weight"),
    ({f"{KEY}.lora_down.weight": torch.ones(4, 320), f"{KEY}.lora_up.weight": torch.ones(320, 4),
      f"{KEY}.dora_scale": torch.ones(320, 1)}, "DoRA"),
    ({f"{Q}.lora_A.default.weight": torch.ones(4, 320), f"{Q}.lora_B.default.weight": torch.ones(320, 4),
      f"{Q}.lora_A.other.weight": torch.ones(4, 320), f"{Q}.lora_B.other.weight": torch.ones(320, 4)},
     "appears twice|several PEFT adapters"),
    ({f"{KEY}.lora_down.weight": torch.ones(4, 320), f"{KEY}.lora_up.weight": torch.ones(320, 4),
      f"{Q[len('unet.'):]}.lora_A.weight": torch.ones(4, 320), f"{Q[len('unet.'):]}.lora_B.weight": torch.ones(320, 4)},
     "appears twice"),
])
def test_bad_tensors_fail_naming_the_file_and_key(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraFormatError, match=message):
        lora_files.load_expert(tmp_path / "bad.safetensors", architecture="sd15")


def test_peft_adapter_names_are_read_and_several_refused(tmp_path):
    name = Q[len("unet."):]
    one = {f"{name}.lora_A.default.weight": torch.ones(4, 320), f"{name}.lora_B.default.weight": torch.ones(320, 4)}
    save_file(one, str(tmp_path / "one.safetensors"))
    assert lora_files.load_expert(tmp_path / "one.safetensors").module_names == [Q]
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    two = dict(one, **{f"{other}.lora_A.style.weight": torch.ones(4, 320),
                       f"{other}.lora_B.style.weight": torch.ones(320, 4)})
    save_file(two, str(tmp_path / "two.safetensors"))
    with pytest.raises(LoraFormatError, match=r"several PEFT adapters \(\['default', 'style'\]\)"):
        lora_files.load_expert(tmp_path / "two.safetensors")


def test_old_diffusers_processor_keys_are_read(tmp_path):
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    generator = torch.Generator().manual_seed(0)
    tensors = {f"{prefix}.to_q_lora.down.weight": torch.randn(4, 320, generator=generator),
               f"{prefix}.to_q_lora.up.weight": torch.randn(320, 4, generator=generator),
               f"{prefix}.to_out_lora.down.weight": torch.randn(4, 320, generator=generator),
               f"{prefix}.to_out_lora.up.weight": torch.randn(320, 4, generator=generator)}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    expert = lora_files.load_expert(tmp_path / "old.safetensors", architecture="sd15")
    assert expert.module_names == [Q.replace("to_q", "to_out.0"), Q]
    assert torch.equal(expert.modules[Q].down, tensors[f"{prefix}.to_q_lora.down.weight"])


def test_missing_alpha_means_scale_one_and_mixed_dtypes_are_read(tmp_path, caplog):
    tensors = {f"{KEY}.lora_down.weight": torch.randn(4, 320).half(),
               f"{KEY}.lora_up.weight": torch.randn(320, 4).bfloat16()}
    save_file(tensors, str(tmp_path / "noalpha.safetensors"))
    with caplog.at_level(logging.WARNING, logger="comfyui_safetydpo.lora_files"):
        expert = lora_files.load_expert(tmp_path / "noalpha.safetensors", architecture="sd15")
    assert "no alpha" in caplog.text
    module = expert.modules[Q]
    assert module.alpha == 4.0 and module.down.dtype == torch.float32 and module.up.dtype == torch.float32
    assert torch.equal(module.up, tensors[f"{KEY}.lora_up.weight"].float())


def test_architecture_detection_and_compatibility_check():
    assert lora_files.detect_architecture(make_expert()) == "sd15"
    sd21 = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": ((640, 1024), 4, 4.0)}
    assert lora_files.detect_architecture(make_expert(sd21, architecture="unknown")) == "sd21"
    sdxl = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": ((640, 2048), 4, 4.0)}
    assert lora_files.detect_architecture(make_expert(sdxl, architecture="unknown")) == "sdxl"
    add = {"unet.add_embedding.linear_1": ((1280, 2816), 4, 4.0)}
    assert lora_files.detect_architecture(make_expert(add, architecture="unknown")) == "sdxl"
    text_h = {"text_encoder.text_model.encoder.layers.0.self_attn.k_proj": ((1024, 1024), 4, 4.0)}
    assert lora_files.detect_architecture(make_expert(text_h, architecture="unknown")) == "sd21"
    demo = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": ((32, 64), 4, 4.0)}
    assert lora_files.detect_architecture(make_expert(demo, architecture="unknown")) == "unknown"
    tensors, _ = lora_files.expert_to_state_dict(make_expert(sd21, architecture="unknown"), "native",
                                                 layout=unet_keys.LAYOUTS["sd21"])
    assert lora_files.detect_architecture(tensors) == "sd21"

    with pytest.raises(ArchitectureMismatchError, match="e.safetensors.*is for sd15, but the model is sdxl"):
        lora_files.check_compatible(make_expert(), "sdxl", "e.safetensors")
    lora_files.check_compatible(make_expert(), "sd15")
    lora_files.check_compatible(make_expert(architecture="unknown"), "sdxl")


def test_unknown_key_format_and_atomic_write(tmp_path):
    with pytest.raises(LoraFormatError, match="unknown key format"):
        lora_files.save_expert(make_expert(), tmp_path / "e.safetensors", key_format="a1111")
    path = lora_files.save_expert(make_expert(seed=1), tmp_path / "e.safetensors")
    lora_files.save_expert(make_expert(seed=2), path)  # replaces in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]  # no temp files left
    assert torch.equal(lora_files.load_expert(path).modules[Q].down, make_expert(seed=2).modules[Q].down)
