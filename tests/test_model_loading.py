"""Loading SD1.5-, SD2.1- and SDXL-shaped models offline, from diffusers folders and single files,
and one DPO training step on each."""

from __future__ import annotations

import pytest
import torch

from training_helpers import save_tiny_diffusers_folder, save_tiny_single_file, write_tiny_clip_tokenizer

from comfyui_safetydpo.errors import ArchitectureMismatchError, MissingWeightsError
from comfyui_safetydpo.model_loading import detect_checkpoint_architecture, load_bundle
from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, save_image_tensor
from comfyui_safetydpo.training import TrainingConfig, train_expert

EXPECTED = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}


def _pairs(root, size=16, count=2):
    pairs = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        save_image_tensor(torch.rand(3, size, size, generator=g) * 2 - 1, root / f"w{i}.png")
        save_image_tensor(torch.rand(3, size, size, generator=g) * 2 - 1, root / f"l{i}.png")
        pairs.append(PreferencePair(f"p{i}", "a red square", "a blue square", ("Violence",), f"w{i}.png", f"l{i}.png"))
    return PreferencePairs(root=root, pairs=pairs)


@pytest.mark.parametrize("architecture", ["sd15", "sd21", "sdxl"])
def test_folder_and_single_file_load_the_same_model_and_train_a_step(architecture, tmp_path):
    folder = save_tiny_diffusers_folder(architecture, tmp_path / "folder")
    single = save_tiny_single_file(architecture, tmp_path / f"{architecture}.safetensors")
    tokenizers = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    from_folder = load_bundle(folder)
    from_file = load_bundle(single, tokenizer_dir=tokenizers, resolution=from_folder.resolution)
    for bundle in (from_folder, from_file):
        assert bundle.architecture == architecture
        assert bundle.prediction_type == EXPECTED[architecture]
        assert bundle.vae is not None and bundle.is_sdxl == (architecture == "sdxl")
    # identical weights through both paths: UNet, VAE, and the same text conditioning
    folder_unet, file_unet = from_folder.unet.state_dict(), from_file.unet.state_dict()
    assert set(folder_unet) == set(file_unet)
    assert all(torch.equal(folder_unet[k], file_unet[k]) for k in folder_unet)
    folder_vae, file_vae = from_folder.vae.state_dict(), from_file.vae.state_dict()
    assert all(torch.allclose(folder_vae[k], file_vae[k].reshape(folder_vae[k].shape)) for k in folder_vae)
    a, b = from_folder.encode_prompts(["a red square"]), from_file.encode_prompts(["a red square"])
    assert torch.allclose(a.encoder_hidden_states, b.encoder_hidden_states, atol=1e-5)
    for key in a.added_cond:
        assert torch.allclose(a.added_cond[key], b.added_cond[key], atol=1e-5)

    before = {k: v.clone() for k, v in from_file.unet.state_dict().items()}
    config = TrainingConfig(max_steps=1, batch_size=2, learning_rate=1e-3, sft_weight=0.5, checkpoint_every=0)
    result = train_expert(from_file, _pairs(tmp_path / "pairs"), config, output_dir=tmp_path / "run")
    assert result.steps == 1 and result.expert.architecture == architecture
    assert result.expert_path.is_file()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[0].values())
    assert any(float(m.up.abs().sum()) > 0 for m in result.expert.modules.values())
    # training leaves the base model as it was (LoRA removed)
    assert all(torch.equal(before[k], v) for k, v in from_file.unet.state_dict().items())


def test_bad_checkpoints_fail_clearly(tmp_path):
    from safetensors.torch import save_file

    flux_like = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux_like))
    with pytest.raises(ArchitectureMismatchError, match="SD3/Flux"):
        load_bundle(flux_like)
    with pytest.raises(ArchitectureMismatchError, match="pickle"):
        (tmp_path / "model.ckpt").write_bytes(b"x")
        load_bundle(tmp_path / "model.ckpt")
    with pytest.raises(MissingWeightsError, match="no such"):
        load_bundle(tmp_path / "absent.safetensors")
    unet_only = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    with pytest.raises(ArchitectureMismatchError, match="no recognised text encoder"):
        detect_checkpoint_architecture(unet_only)
    single = save_tiny_single_file("sd15", tmp_path / "sd15.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="asked for 'sdxl'"):
        load_bundle(single, architecture="sdxl", tokenizer_dir=write_tiny_clip_tokenizer(tmp_path / "tok"))
