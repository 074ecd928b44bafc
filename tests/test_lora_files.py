"""Reading and writing expert files: every format round-trips exactly; bad files fail clearly."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from comfyui_safetydpo import lora_files
from comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

SD15_MODULES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (1280, 1280),
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": (320, 768),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
}


def make_expert(modules=SD15_MODULES, rank=4, alpha=8.0, seed=0, architecture="sd15", name="hate"):
    generator = torch.Generator().manual_seed(seed)
    return SafetyExpert(
        name=name,
        modules={
            m: LoraModule(torch.randn(rank, i, generator=generator), torch.randn(o, rank, generator=generator), alpha)
            for m, (o, i) in modules.items()
        },
        architecture=architecture,
        categories=["Hate", "Harassment"],
        metadata={"safetydpo_recipe": json.dumps({"method": "dpo", "beta": 5000})},
    )


def assert_same_delta(a: SafetyExpert, b: SafetyExpert, tolerance=0.0):
    assert a.module_names == b.module_names
    for name in a.module_names:
        da, db = a.delta_weight(name), b.delta_weight(name)
        assert torch.allclose(da, db, atol=tolerance, rtol=0), name


@pytest.mark.parametrize("key_format", ["kohya", "native"])
def test_round_trip_is_exact_with_alpha_not_rank(tmp_path, key_format):
    expert = make_expert(alpha=8.0)
    if key_format == "native":
        expert.modules = {k: v for k, v in expert.modules.items() if k.startswith("unet.")}
    path = lora_files.save_expert(expert, tmp_path / "e.safetensors", key_format=key_format)
    loaded = lora_files.load_expert(path)
    assert loaded.architecture == "sd15" and loaded.categories == ["Hate", "Harassment"]
    assert loaded.alpha == 8.0 and loaded.rank == 4
    for name in expert.modules:
        assert torch.equal(loaded.modules[name].down, expert.modules[name].down)
        assert torch.equal(loaded.modules[name].up, expert.modules[name].up)
    assert json.loads(loaded.metadata["safetydpo_recipe"]) == {"method": "dpo", "beta": 5000}


def test_kohya_file_has_explicit_alpha_and_ss_metadata(tmp_path):
    path = lora_files.save_expert(make_expert(alpha=2.0), tmp_path / "e.safetensors")
    tensors, metadata = lora_files.read_safetensors(path)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert all(k.replace(".lora_down.weight", ".alpha") in tensors for k in downs)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sd_v1"


def test_sdxl_text_encoders_use_te1_te2(tmp_path):
    modules = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280),
    }
    expert = make_expert(modules, architecture="sdxl")
    path = lora_files.save_expert(expert, tmp_path / "x.safetensors")
    tensors, _ = lora_files.read_safetensors(path)
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    loaded = lora_files.load_expert(path)
    assert loaded.architecture == "sdxl"
    assert_same_delta(expert, loaded)


def test_diff_tensors_round_trip(tmp_path):
    expert = make_expert()
    expert.diffs = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": torch.randn(320, 320)}
    loaded = lora_files.load_expert(lora_files.save_expert(expert, tmp_path / "d.safetensors"))
    assert torch.equal(loaded.diffs["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"],
                       expert.diffs["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"])


def tiny_sd15_shaped_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
    )


def peft_delta_weights(model, adapter_scale):
    """ΔW of every LoRA layer straight from the live peft modules."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            deltas[name] = (b @ a) * module.scaling["default"]
    return deltas


def test_peft_files_written_by_peft_read_back_to_the_same_delta(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_sd15_shaped_unet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    live = peft_delta_weights(unet, 2.0)
    state = get_peft_model_state_dict(unet)
    assert any("lora_A" in k for k in state)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    expert = lora_files.load_expert(folder / "adapter_model.safetensors")
    assert expert.architecture == "sd15"
    assert len(expert.modules) == len(live)
    for name, delta in live.items():
        assert torch.allclose(expert.delta_weight(f"unet.{name}"), delta.detach(), atol=1e-6), name

    # diffusers' own writer: unet.-prefixed PEFT keys
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "diffusers"), unet_lora_layers=state,
                                              safe_serialization=True)
    files = list((tmp_path / "diffusers").glob("*.safetensors"))
    assert files
    written = lora_files.load_expert(files[0])
    alpha_known = written.alpha
    for name, delta in live.items():
        expected = delta.detach() if alpha_known == 8 else delta.detach() / 2  # alpha = rank when not recorded
        assert torch.allclose(written.delta_weight(f"unet.{name}"), expected, atol=1e-6), name


def test_corrupt_truncated_pickle_empty_files_fail_clearly(tmp_path):
    good = lora_files.save_expert(make_expert(), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraFormatError, match="truncated"):
        lora_files.load_expert(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(LoraFormatError, match="garbage.safetensors"):
        lora_files.load_expert(garbage)
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(LoraFormatError, match="pickle"):
        lora_files.load_expert(pickled)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoraFormatError, match="empty"):
        lora_files.load_expert(empty)
    with pytest.raises(LoraFormatError, match="no such file"):
        lora_files.load_expert(tmp_path / "missing.safetensors")


def test_bad_tensors_fail_naming_the_module(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    nan = {f"{key}.lora_down.weight": torch.full((4, 320), float("nan")), f"{key}.lora_up.weight": torch.ones(320, 4)}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoraFormatError, match="NaN/Inf.*|attn1.to_q"):
        lora_files.load_expert(tmp_path / "nan.safetensors")
    mismatch = {f"{key}.lora_down.weight": torch.ones(4, 320), f"{key}.lora_up.weight": torch.ones(320, 8)}
    save_file(mismatch, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(LoraFormatError, match="mismatched LoRA shapes"):
        lora_files.load_expert(tmp_path / "mismatch.safetensors")
    lonely = {f"{key}.lora_down.weight": torch.ones(4, 320)}
    save_file(lonely, str(tmp_path / "lonely.safetensors"))
    with pytest.raises(LoraFormatError, match="only one of its up/down"):
        lora_files.load_expert(tmp_path / "lonely.safetensors")
    alien = {"model.layers.0.weight": torch.ones(3, 3)}
    save_file(alien, str(tmp_path / "alien.safetensors"))
    with pytest.raises(LoraFormatError, match="not LoRA keys"):
        lora_files.load_expert(tmp_path / "alien.safetensors")


def test_missing_alpha_means_scale_one_and_mixed_dtypes_are_read(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": torch.randn(4, 320).half(), f"{key}.lora_up.weight": torch.randn(320, 4).bfloat16()}
    save_file(tensors, str(tmp_path / "noalpha.safetensors"))
    expert = lora_files.load_expert(tmp_path / "noalpha.safetensors", architecture="sd15")
    module = expert.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert module.alpha == 4.0 and module.down.dtype == torch.float32


def test_architecture_detection_and_compatibility_check():
    assert lora_files.detect_architecture(make_expert()) == "sd15"
    modules = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 1024)}
    assert lora_files.detect_architecture(make_expert(modules, architecture="unknown")) == "sd21"
    with pytest.raises(ArchitectureMismatchError, match="sd15.*sdxl"):
        lora_files.check_compatible(make_expert(), "sdxl", "e.safetensors")
