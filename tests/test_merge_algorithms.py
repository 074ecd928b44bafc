"""The pure tensor functions behind the merge methods, the shared per-module driver, and the per-format key readers."""

from __future__ import annotations

import pytest
import torch

from comfyui_safetydpo import lora_formats, merge_algorithms, merging
from comfyui_safetydpo.errors import LoraFormatError, MergeError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def test_element_co_merge_equals_the_stacked_argmax_it_replaces():
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 4, 3, 3, generator=generator) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    input_sq = [torch.rand(4, generator=generator) for _ in range(3)]  # per input channel of a conv
    merged, winner = merge_algorithms.element_co_merge(iter(deltas), weights, input_sq)
    flat = torch.stack([w * d.reshape(6, -1) for d, w in zip(deltas, weights)])
    scale = torch.stack([x.sqrt().repeat_interleave(9) for x in input_sq]).unsqueeze(1)
    expected_winner = (flat.abs() * scale).argmax(dim=0)
    assert torch.equal(winner.long(), expected_winner)
    assert torch.equal(merged, flat.gather(0, expected_winner.unsqueeze(0))[0].reshape(6, 4, 3, 3))
    assert [d.shape for d in deltas] == [torch.Size([6, 4, 3, 3])] * 3  # inputs untouched
    assert merge_algorithms.win_counts(winner, 3).sum() == merged.numel()


def test_row_winners_first_expert_wins_ties_and_weight_zero_never_wins():
    activations = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 9.0])]
    assert merge_algorithms.row_winners(activations, [1.0, 1.0]).tolist() == [0, 0, 1]
    assert merge_algorithms.row_winners(activations, [1.0, 0.0]).tolist() == [0, 0, 0]
    kept = merge_algorithms.keep_rows(torch.ones(3, 2, 1, 1), torch.tensor([True, False, True]))
    assert kept[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]


def test_truncated_svd_of_factors_equals_the_svd_of_the_product():
    generator = torch.Generator().manual_seed(1)
    up, down = torch.randn(12, 5, generator=generator), torch.randn(5, 9, generator=generator)
    template = LoraModule(down, up, 5.0)
    small, (residual, norm) = merge_algorithms.truncated_svd_of_factors(up, down, 3, template)
    full, (full_residual, full_norm) = merge_algorithms.truncated_svd(up @ down, 3)
    assert torch.allclose(small.up @ small.down, full.up @ full.down, atol=1e-4)
    assert residual == pytest.approx(full_residual, rel=1e-4) and norm == pytest.approx(full_norm, rel=1e-4)
    per_module, overall = merge_algorithms.relative_errors({"a": (residual, norm)})
    assert per_module["a"] == pytest.approx(overall) and 0 < overall < 1


def _expert(name, seed):
    generator = torch.Generator().manual_seed(seed)
    return SafetyExpert(name, {m: LoraModule(torch.randn(2, 8, generator=generator),
                                             torch.randn(8, 2, generator=generator), 2.0) for m in (Q, K)},
                        architecture="sd15")


def test_the_driver_prepares_every_module_before_merging_any():
    experts = [_expert("a", 0), _expert("b", 1)]
    calls = []

    def prepare(module, competitors):
        calls.append(("prepare", module))
        if module == K:
            raise MergeError("statistics for K are missing")

    def merge_module(module, competitors, prepared):
        calls.append(("merge", module))
        return merging.ModuleMerge(diff=torch.zeros(8, 8))

    with pytest.raises(MergeError, match="K are missing"):
        merging.merge_per_module([(e, 1.0) for e in experts], merge_module, prepare=prepare)
    assert calls == [("prepare", Q), ("prepare", K)]


def test_the_driver_compresses_diffs_at_a_rank_and_collects_win_shares():
    experts = [_expert("a", 0), _expert("b", 1)]

    def merge_module(module, competitors, prepared):
        delta = merge_algorithms.weighted_sum([e.delta_weight(module) for e, _ in competitors],
                                              [w for _, w in competitors])
        return merging.ModuleMerge(diff=delta, wins=torch.tensor([3.0, 1.0]))

    merged = merging.merge_per_module([(experts[0], 1.0), (experts[1], 0.5)], merge_module, rank=4)
    assert sorted(merged.modules) == sorted([Q, K]) and merged.diffs == {}
    assert merged.wins[Q] == {"a": 0.75, "b": 0.25}
    expected = experts[0].delta_weight(Q) + 0.5 * experts[1].delta_weight(Q)
    assert torch.allclose(merged.modules[Q].delta_weight(), expected, atol=1e-5)  # rank 4 = Σ r_k: exact
    assert merged.errors[Q][0] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("key, module, role, peft", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_attentions_0_proj_in",
     "down", False),
    ("diffusion_model.input_blocks.1.1.proj_in.lora_up.weight", "diffusion_model.input_blocks.1.1.proj_in",
     "up", False),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", "lora_te_text_model_encoder_layers_0_mlp_fc1",
     "alpha", False),
    ("unet.mid_block.attentions.0.proj_in.diff", "unet.mid_block.attentions.0.proj_in", "diff", False),
    ("unet.mid_block.attentions.0.proj_in.lora_A.weight", "unet.mid_block.attentions.0.proj_in", "down", True),
    ("unet.mid_block.attentions.0.proj_in.lora_B.default.weight", "unet.mid_block.attentions.0.proj_in", "up", True),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", "up", True),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight",
     "text_encoder.text_model.encoder.layers.0.mlp.fc1", "down", True),
])
def test_each_key_format_has_its_reader(key, module, role, peft):
    found = lora_formats.key_role(key)
    assert (found.module, found.role, found.peft) == (module, role, peft)


def test_unknown_and_unsupported_keys():
    assert lora_formats.key_role("model.embed.weight") is None
    with pytest.raises(LoraFormatError, match="LoHa"):
        lora_formats.key_role("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a")


def test_module_names_of_every_prefix_style_meet_in_one_canonical_name():
    from comfyui_safetydpo import unet_keys

    namer = lora_formats.ModuleNamer(unet_keys.LAYOUTS["sd15"], "sd15", "test")
    canonical = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    spellings = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 unet_keys.canonical_to_native(canonical, unet_keys.LAYOUTS["sd15"]),
                 "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert {namer(s) for s in spellings} == {canonical}
    no_layout = lora_formats.ModuleNamer(None, "unknown", "file.safetensors")
    with pytest.raises(LoraFormatError, match="file.safetensors: ComfyUI native .* need the UNet layout"):
        no_layout(spellings[1])
