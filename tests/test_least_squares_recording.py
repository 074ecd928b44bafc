"""Least-squares merge as users reach it: the dispatcher, prompts per expert, recording by sampling a
diffusers model, and ``trainer/merge.py`` (statistics kinds detected, clear errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import save_tiny_diffusers_folder

from shared_helpers import load_script

from comfyui_safetydpo import calibration, lora_files, merging
from comfyui_safetydpo.errors import DatasetError, MergeError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert
from comfyui_safetydpo.least_squares_merge import LayerInputStatistics, merge_least_squares
from comfyui_safetydpo.least_squares_statistics import (
    merge_prompts,
    parse_category_lines,
    prompts_per_expert,
    record_bundle_statistics,
)
from comfyui_safetydpo.model_loading import load_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ("unsafe_prompt,safe_prompt,category\n"
            "a bloody fight,a friendly handshake,Violence\n"
            "a knife attack,a kitchen knife on a table,violence\n"
            "a hateful crowd,a cheering crowd,Hate\n")
SAFE = "a mountain lake\na bowl of fruit\n"


def cross_attention_expert(unet, name, seed, categories):
    """A rank-2 LoRA on every cross-attention key/value projection (inputs = text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for module_name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.endswith(("attn2.to_k", "attn2.to_v")):
            modules[f"unet.{module_name}"] = LoraModule(torch.randn(2, module.in_features, generator=g),
                                                        torch.randn(module.out_features, 2, generator=g) * 0.1, 2.0)
    return SafetyExpert(name, modules, architecture="sd15", categories=list(categories))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("least_squares")
    model = save_tiny_diffusers_folder("sd15", root / "model")
    bundle = load_bundle(model)
    experts = [cross_attention_expert(bundle.unet, "hate", 1, ["Hate"]),
               cross_attention_expert(bundle.unet, "violence", 2, ["Violence"])]
    (root / "concepts.csv").write_text(CONCEPTS)
    (root / "safe.txt").write_text(SAFE)
    return root, model, bundle, experts


def test_prompts_are_grouped_by_each_experts_categories():
    from comfyui_safetydpo.concepts import parse_pair_lines

    pairs = parse_pair_lines("a bloody fight | a handshake | Violence\na hateful crowd | a crowd | hate\n")
    prompts = merge_prompts(pairs, "Violence: a knife attack\n# comment\nself harm: a cut wrist", ["a lake"])
    assert prompts.concept == {"Violence": ["a bloody fight", "a knife attack"], "Hate": ["a hateful crowd"],
                               "Self-harm": ["a cut wrist"]}
    assert prompts.safe == ["a handshake", "a crowd", "a lake"]
    experts = [SafetyExpert("v", {}, categories=["violence", "Hate"]), SafetyExpert("s", {}, categories=["Self-harm"])]
    assert prompts_per_expert(experts, prompts.concept) == {
        "v": ["a bloody fight", "a knife attack", "a hateful crowd"], "s": ["a cut wrist"]}
    with pytest.raises(MergeError, match=r"expert 'x' \(categories \['Sexual'\]\) has no concept prompts.*Violence"):
        prompts_per_expert([SafetyExpert("x", {}, categories=["Sexual"])], prompts.concept)
    with pytest.raises(MergeError, match="'y' records no categories"):
        prompts_per_expert([SafetyExpert("y", {})], prompts.concept)
    with pytest.raises(DatasetError, match="line 2: expected 'Category: prompt'"):
        parse_category_lines("Hate: a\njust a prompt")
    with pytest.raises(MergeError, match="need safe prompts"):
        merge_prompts((), "Hate: a hateful crowd")


def test_recording_samples_each_experts_prompts_and_the_safe_prompts_with_guidance(world):
    _, _, bundle, experts = world
    per_expert = {"hate": ["a hateful crowd"], "violence": ["a bloody fight", "a knife attack"]}
    safe = ["a mountain lake", "a bowl of fruit"]
    statistics = record_bundle_statistics(bundle, experts, per_expert, safe, steps=2, guidance_scale=3.0,
                                          images_per_prompt=2, seed=5)

    def gram(prompts):
        """E x xᵀ over the tokens a cross-attention key sees: with guidance, half unconditional ('')."""
        states = [bundle.encode_prompts([p]).encoder_hidden_states[0].double() for p in prompts]
        empty = bundle.encode_prompts([""]).encoder_hidden_states[0].double()
        conditional = sum(s.t() @ s for s in states) / (len(states) * states[0].shape[0])
        return (0.5 * conditional + 0.5 * empty.t() @ empty / empty.shape[0]).float()

    module = next(m for m in experts[0].module_names if m.endswith("to_k"))
    expected_concept = gram(per_expert["hate"]) + gram(per_expert["violence"])
    assert torch.allclose(statistics.concept_gram[module], expected_concept, rtol=1e-4, atol=1e-5)
    assert torch.allclose(statistics.safe_gram[module], gram(safe), rtol=1e-4, atol=1e-5)
    assert statistics.info["steps"] == 2 and statistics.info["concept_prompts"] == {"hate": 1, "violence": 2}
    unet_weight = dict(bundle.unet.named_parameters())[module[len("unet."):] + ".weight"]
    before = unet_weight.clone()
    record_bundle_statistics(bundle, experts, per_expert, safe, steps=1, images_per_prompt=1)
    assert torch.equal(unet_weight, before), "experts must be applied only while recording"

    # The dispatcher merges with these statistics exactly as the merge itself does, and knows the kinds apart.
    direct = merge_least_squares(experts, [1.0, 0.5], statistics, preserve_weight=2.0)
    routed = merging.merge_experts(experts, [1.0, 0.5], "least_squares", statistics=statistics, preserve_weight=2.0)
    assert all(torch.equal(direct.delta_weight(m), routed.delta_weight(m)) for m in direct.module_names)
    assert merging.merge_recipe(routed)["preserve_weight"] == 2.0
    with pytest.raises(MergeError, match="method 'co_merge' needs Co-Merge calibration statistics.*least_squares"):
        merging.merge_experts(experts, [1, 1], "co_merge", statistics=statistics)
    calibration_stats = calibration.CalibrationStatistics({}, {}, {})
    with pytest.raises(MergeError, match="method 'least_squares' needs least-squares"):
        merging.merge_experts(experts, [1, 1], "least_squares", statistics=calibration_stats)
    with pytest.raises(MergeError, match="needs layer statistics"):
        merging.merge_experts(experts, [1, 1], "least_squares")
    with pytest.raises(MergeError, match="granularity"):
        merging.merge_experts(experts, [1, 1], "least_squares", statistics=statistics, granularity="row")

    # Weight 0: the hate prompts' keys/values move far less than with the hate expert at weight 1.
    hate_tokens = bundle.encode_prompts(["a hateful crowd"]).encoder_hidden_states[0]
    both = merge_least_squares(experts, [1.0, 1.0], statistics)
    without_hate = merge_least_squares(experts, [0.0, 1.0], statistics)
    change = {name: float((hate_tokens @ merged.delta_weight(module).t()).norm())
              for name, merged in (("both", both), ("without", without_hate))}
    assert change["without"] < 0.5 * change["both"], change  # measured 0.33


def merge_cli():
    return load_script("trainer/merge.py", "safetydpo_merge_cli_ls")


def test_command_line_records_least_squares_statistics_and_merges(world, capsys):
    root, model, _, experts = world
    cli = merge_cli()
    paths = [str(lora_files.save_expert(e, root / f"{e.name}.safetensors")) for e in experts]
    stats = root / "ls_stats.safetensors"
    common = ["--model", str(model), "--steps", "2", "--images-per-prompt", "1"]
    assert cli.main(["statistics", *paths, "--method", "least_squares", "--concepts", str(root / "concepts.csv"),
                     "--safe-prompts", str(root / "safe.txt"), *common, "--output", str(stats)]) == 0
    statistics = LayerInputStatistics.load(stats)
    assert set(statistics.projections) == {"hate", "violence"}
    assert statistics.info["concept_prompts"] == {"hate": 1, "violence": 2}
    assert statistics.info["safe_prompts"] == 5  # three safe rewrites + two prompts of the file

    out = root / "merged.safetensors"
    assert cli.main([*paths, "--weights", "1,0", "--method", "least_squares", "--statistics", str(stats),
                     "--preserve-weight", "3", "--output", str(out)]) == 0
    assert "change on safe inputs is" in capsys.readouterr().out
    merged = lora_files.load_expert(out)
    expected = merge_least_squares(experts, [1.0, 0.0], statistics, preserve_weight=3.0)
    for m in expected.module_names:
        assert torch.allclose(merged.delta_weight(m), expected.delta_weight(m), atol=1e-6)
    assert merging.merge_recipe(merged)["preserve_weight"] == 3.0

    # A Co-Merge statistics file given to least_squares (and the other way round) is named as the wrong kind.
    (root / "prompts.txt").write_text("a bloody fight\na hateful crowd\n")
    co_stats = root / "co_stats.safetensors"
    assert cli.main(["statistics", *paths, "--model", str(model), "--prompts", str(root / "prompts.txt"),
                     "--timesteps", "500", "--output", str(co_stats)]) == 0
    capsys.readouterr()
    wrong = root / "wrong.safetensors"
    assert cli.main([*paths, "--method", "least_squares", "--statistics", str(co_stats), "--output", str(wrong)]) == 2
    assert "holds statistics for method 'co_merge'" in capsys.readouterr().err
    assert cli.main([*paths, "--method", "co_merge", "--statistics", str(stats), "--output", str(wrong)]) == 2
    assert "holds statistics for method 'least_squares'" in capsys.readouterr().err
    assert cli.main([*paths, "--method", "least_squares", "--output", str(wrong)]) == 2
    assert "--concepts FILE" in capsys.readouterr().err
    assert not wrong.exists()

    # An expert whose categories have no prompts in the concept list is named with its categories.
    sexual = SafetyExpert("nsfw", dict(experts[0].modules), architecture="sd15", categories=["Sexual"])
    sexual_path = str(lora_files.save_expert(sexual, root / "nsfw.safetensors"))
    assert cli.main(["statistics", paths[0], sexual_path, "--method", "least_squares", "--concepts",
                     str(root / "concepts.csv"), *common, "--output", str(root / "never.safetensors")]) == 2
    assert "expert 'nsfw' (categories ['Sexual']) has no concept prompts" in capsys.readouterr().err
