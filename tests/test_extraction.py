"""Extract Safety Expert, library and command line: a known LoRA fused into a small diffusers UNet is
recovered from (aligned model, base) in any mix of key layouts, exactly or at its rank, with the
errors and the unrequested differences reported. The ComfyUI side is in test_extraction_comfyui.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_safetydpo import extraction, lora_files, unet_keys
from comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError, MissingWeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]
RANK = 4


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def attention_weights(state):
    return [k for k in state if k.endswith(".weight") and
            any(f".{a}.{p}.weight" in k for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))]


def known_lora(state, seed=1):
    """{canonical module: ΔW} of a rank-4 LoRA on every attention projection (alpha 8, scale 2)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for key in attention_weights(state):
        out, inp = state[key].shape
        down = torch.randn(RANK, inp, generator=generator) * 0.1
        up = torch.randn(out, RANK, generator=generator) * 0.1
        deltas["unet." + key[: -len(".weight")]] = 2.0 * up @ down
    return deltas


def save_ldm_checkpoint(state, path: Path):
    """A single-file (LDM-named) checkpoint of a diffusers UNet state dict, plus a fake VAE tensor."""
    from safetensors.torch import save_file

    layout = unet_keys.infer_layout_from_diffusers_config(tiny_unet().config)
    tensors = {}
    for key, value in state.items():
        module, _, field = key.rpartition(".")
        tensors[f"model.diffusion_model.{unet_keys.diffusers_to_ldm(module, layout)}.{field}"] = value.contiguous()
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.ones(4, 4, 3, 3)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base as an LDM single file; aligned (base + LoRA + a changed resnet conv and bias) as a diffusers folder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("extract")
    unet = tiny_unet()
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    deltas = known_lora(base)
    safe = {k: v.clone() for k, v in base.items()}
    for module, delta in deltas.items():
        safe[module[len("unet."):] + ".weight"] += delta
    safe["down_blocks.0.resnets.0.conv1.weight"] += 0.01
    safe["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"] += 0.01
    base_file = save_ldm_checkpoint(base, root / "base.safetensors")
    folder = root / "safe_diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    save_file({k: v.contiguous() for k, v in safe.items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return root, base_file, folder, deltas


def test_known_lora_is_recovered_at_its_rank_across_layouts(models):
    root, base_file, folder, deltas = models
    safe, base = extraction.weights_from_path(folder), extraction.weights_from_path(base_file)
    assert (safe.layout, base.layout) == ("diffusers", "ldm")
    expert, report = extraction.extract_expert(safe, base, rank=RANK, name="recovered", categories=["Sexual"])
    assert set(expert.modules) == set(deltas) and not expert.diffs
    assert all(m.rank == RANK and m.alpha == RANK for m in expert.modules.values())
    for module, delta in deltas.items():
        error = (expert.delta_weight(module) - delta).norm() / delta.norm()
        assert error < 1e-4, (module, float(error))
    assert report.overall_relative_error < 1e-4 and max(report.relative_error.values()) < 1e-4
    assert 0 < report.relative_change < 0.5
    # Differences outside the attention projections are reported, not dropped silently.
    assert set(report.unrequested) == {"unet.down_blocks.0.resnets.0.conv1.weight",
                                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"}
    assert "NOT in the expert: 2 other parameters differ" in report.summary()
    assert report.unrequested_groups == {"unet bias": 1, "unet other": 1}
    # The saved file carries the categories and the report, and reads back to the same ΔW.
    path = lora_files.save_expert(expert, root / "recovered.safetensors")
    again = lora_files.load_expert(path)
    assert again.categories == ["Sexual"]
    saved = json.loads(again.metadata[extraction.EXTRACTION_KEY])
    assert saved["rank"] == RANK and set(saved["relative_error"]) == set(deltas)
    assert "unet.down_blocks.0.resnets.0.conv1.weight" in saved["unrequested"]


def test_below_its_rank_the_error_is_the_dropped_energy(models):
    _, base_file, folder, deltas = models
    safe, base = extraction.weights_from_path(folder), extraction.weights_from_path(base_file)
    expert, report = extraction.extract_expert(safe, base, rank=2)
    module = sorted(deltas)[0]
    s = torch.linalg.svdvals(deltas[module])
    expected = float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    assert report.relative_error[module] == pytest.approx(expected, rel=1e-3)
    measured = float((expert.delta_weight(module) - deltas[module]).norm() / deltas[module].norm())
    assert measured == pytest.approx(expected, rel=1e-3)
    assert report.overall_relative_error > 0.05


def test_energy_threshold_picks_the_rank_per_module(models):
    _, base_file, folder, deltas = models
    safe, base = extraction.weights_from_path(folder), extraction.weights_from_path(base_file)
    expert, report = extraction.extract_expert(safe, base, energy=0.9999, max_rank=16)
    assert report.rank is None and report.energy == 0.9999
    assert all(1 <= r <= RANK for r in report.ranks.values())
    assert all(e ** 2 <= 1 - 0.9999 + 1e-6 for e in report.relative_error.values())
    _, capped = extraction.extract_expert(safe, base, energy=1.0, max_rank=1)
    assert set(capped.ranks.values()) == {1}


def test_exact_diffs_and_other_layers_on_request(models):
    _, base_file, folder, deltas = models
    safe, base = extraction.weights_from_path(folder), extraction.weights_from_path(base_file)
    expert, report = extraction.extract_expert(safe, base)  # no rank, no energy: exact differences
    assert report.mode == "diff" and set(expert.diffs) == set(deltas) and not expert.modules
    for module, delta in deltas.items():
        assert torch.allclose(expert.diffs[module], delta, atol=1e-6)
    everything, report = extraction.extract_expert(safe, base, layers="unet", rank=RANK)
    assert "unet.down_blocks.0.resnets.0.conv1" in everything.modules
    assert everything.modules["unet.down_blocks.0.resnets.0.conv1"].down.dim() == 4
    assert list(report.unrequested) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"]
    only_k, _ = extraction.extract_expert(safe, base, layers="*attn2.to_k", rank=RANK)
    assert set(only_k.modules) == {m for m in deltas if m.endswith("attn2.to_k")}


def test_bad_inputs_say_what_to_give(models, tmp_path):
    root, base_file, folder, _ = models
    safe, base = extraction.weights_from_path(folder), extraction.weights_from_path(base_file)
    with pytest.raises(ArchitectureMismatchError, match="no requested layer .* differs"):
        extraction.extract_expert(base, extraction.weights_from_path(base_file), rank=RANK)
    with pytest.raises(ArchitectureMismatchError, match="energy must be in"):
        extraction.extract_expert(safe, base, energy=1.5)
    with pytest.raises(ArchitectureMismatchError, match="not a valid regular expression"):
        extraction.extract_expert(safe, base, layers="re:(")
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x02junk")
    with pytest.raises(LoraFormatError, match="pickle"):
        extraction.weights_from_path(pickle_file)
    with pytest.raises(MissingWeightsError, match="no such model"):
        extraction.weights_from_path(tmp_path / "missing")
    # A base of another shape is refused with both sources named.
    from safetensors.torch import save_file

    other = {k: v for k, v in tiny_unet().state_dict().items()}
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    other[key] = torch.zeros(other[key].shape[0], other[key].shape[1] + 1)
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ArchitectureMismatchError, match="not the model the aligned one was fine-tuned from"):
        extraction.extract_expert(safe, extraction.weights_from_path(tmp_path / "other.safetensors"), rank=RANK)


def test_command_line_writes_the_expert_and_prints_the_report(models, tmp_path):
    root, base_file, folder, deltas = models
    output = tmp_path / "experts" / "released.safetensors"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "trainer" / "extract.py"), "--safe", str(folder), "--base", str(base_file),
         "--rank", str(RANK), "--categories", "Sexual,Violence", "--output", str(output),
         "--report", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "relative error" in result.stdout and "NOT in the expert: 2 other parameters differ" in result.stdout
    expert = lora_files.load_expert(output)
    assert expert.categories == ["Sexual", "Violence"] and set(expert.modules) == set(deltas)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["overall_relative_error"] < 1e-4
    failed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "trainer" / "extract.py"), "--safe", str(base_file), "--base", str(base_file),
         "--rank", "4", "--output", str(tmp_path / "none.safetensors")],
        capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "no requested layer" in failed.stderr
    assert not (tmp_path / "none.safetensors").exists()


def test_sharded_fp16_variant_folders_and_text_encoders_meet_single_files(tmp_path):
    """Safe: a diffusers folder with a fp16-variant UNet and a text_encoder/; base: a single file with
    CLIP-L under cond_stage_model.transformer. and a UNet in two shards elsewhere: names still meet."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_state = {k: v.detach().half().float() for k, v in tiny_unet().state_dict().items()}
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=1, vocab_size=100, max_position_embeddings=8))
    text_state = {unet_keys.normalize_text_encoder_path(k): v.detach().clone() for k, v in text.state_dict().items()}
    deltas = known_lora(unet_state)
    safe_unet = {k: v.clone() for k, v in unet_state.items()}
    for module, delta in deltas.items():
        safe_unet[module[len("unet."):] + ".weight"] = (safe_unet[module[len("unet."):] + ".weight"] + delta).half()
    q = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    safe_text = dict(text_state, **{q: text_state[q] + 0.01})

    folder = tmp_path / "safe"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text("{}")
    save_file({k: v.half().contiguous() for k, v in safe_unet.items()},
              str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    save_file({k: v.contiguous() for k, v in safe_text.items()}, str(folder / "text_encoder" / "model.safetensors"))
    base_file = save_ldm_checkpoint(unet_state, tmp_path / "base.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(base_file))
    tensors.update({f"cond_stage_model.transformer.{k}": v.contiguous() for k, v in text_state.items()})
    save_file(tensors, str(base_file))
    shards = tmp_path / "base_unet"
    shards.mkdir()
    keys = sorted(unet_state)
    for index, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: unet_state[k].contiguous() for k in part},
                  str(shards / f"diffusion_pytorch_model-0000{index + 1}-of-00002.safetensors"))

    safe = extraction.weights_from_path(folder)
    for base in (extraction.weights_from_path(base_file), extraction.weights_from_path(shards)):
        expert, report = extraction.extract_expert(safe, base, rank=RANK)
        assert set(expert.modules) == set(deltas)
        # fp16 storage rounds W + ΔW: the error is the rounding, far below the change itself.
        assert report.overall_relative_error < 1e-2
    base = extraction.weights_from_path(base_file)
    _, report = extraction.extract_expert(safe, base, rank=RANK)
    assert report.unrequested == {
        "text_encoder." + q: pytest.approx(float(0.01 * (32 * 32) ** 0.5 / text_state[q].norm()), rel=1e-3)}
    assert "NOT in the expert: 1 other parameters differ (text_encoder: 1)" in report.summary()
    text_expert, _ = extraction.extract_expert(safe, base, layers="text_encoder", rank=1)
    assert list(text_expert.modules) == ["text_encoder." + q[: -len(".weight")]]
    assert torch.allclose(text_expert.delta_weight("text_encoder." + q[: -len(".weight")]),
                          torch.full((32, 32), 0.01), atol=1e-6)
