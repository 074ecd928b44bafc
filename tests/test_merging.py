"""Merging: linear is exact, Co-Merge keeps the most active expert's rows, baselines run through peft."""

from __future__ import annotations

import json

import pytest
import torch

from shared_helpers import REPO_ROOT, load_script, random_expert

from comfyui_safetydpo import lora_files, merging
from comfyui_safetydpo.calibration import CalibrationStatistics, ModuleStatistics, expert_fingerprint
from comfyui_safetydpo.errors import ArchitectureMismatchError, MergeError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

MODULES = {"unet.a.to_q": (12, 10), "unet.b.to_k": (16, 10), "unet.c.conv": (6, 4)}


def make_expert(name, seed, scale=1.0, rank=3, alpha=6.0, modules=MODULES):
    shapes = {m: (o, i, 3, 3) if m.endswith("conv") else (o, i) for m, (o, i) in modules.items()}
    return random_expert(name, shapes, seed, rank, alpha, scale)


def make_statistics(experts, activations):
    """activations[expert][module] = row activation tensor; input scale 1."""
    stats = {}
    for e in experts:
        stats[e.name] = {}
        for m in e.module_names:
            shape = e.modules[m].weight_shape
            stats[e.name][m] = ModuleStatistics(activations[e.name][m], torch.ones(shape[1]), 10)
    return CalibrationStatistics(stats, {e.name: expert_fingerprint(e) for e in experts})


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_linear_merge_equals_weighted_sum_of_deltas():
    experts = [make_expert("hate", 0), make_expert("violence", 1), make_expert("sexual", 2)]
    weights = [1.0, 0.5, 2.0]
    merged = merging.merge_linear(experts, weights)
    for m in MODULES:
        expected = sum(w * e.delta_weight(m) for e, w in zip(experts, weights))
        assert relative_error(merged.delta_weight(m), expected) <= 1e-6
        assert merged.modules[m].rank == 9
    assert merged.categories == ["Hate", "Violence", "Sexual"]


def test_zero_weight_leaves_the_expert_out():
    experts = [make_expert("hate", 0), make_expert("violence", 1)]
    merged = merging.merge_linear(experts, [1.0, 0.0])
    for m in MODULES:
        assert relative_error(merged.delta_weight(m), experts[0].delta_weight(m)) <= 1e-6
    assert merged.categories == ["Hate"]


def test_co_merge_rows_come_from_the_most_active_expert_not_the_largest_weights():
    # Expert "loud" has 10x larger weights, but on calibration inputs "quiet" is more active on
    # even rows: the statistics, not the norms, must decide.
    loud, quiet = make_expert("loud", 0, scale=10.0), make_expert("quiet", 1, scale=1.0)
    activations = {"loud": {}, "quiet": {}}
    for m, (o, _) in MODULES.items():
        even = torch.arange(o) % 2 == 0
        activations["loud"][m] = torch.where(even, torch.tensor(1.0), torch.tensor(5.0))
        activations["quiet"][m] = torch.where(even, torch.tensor(3.0), torch.tensor(1.0))
    stats = make_statistics([loud, quiet], activations)
    weights = [1.0, 0.8]
    merged = merging.co_merge([loud, quiet], weights, stats, granularity="row")
    for m, (o, _) in MODULES.items():
        delta = merged.delta_weight(m).reshape(o, -1)
        loud_rows = loud.delta_weight(m).reshape(o, -1)
        quiet_rows = quiet.delta_weight(m).reshape(o, -1)
        for j in range(o):
            winner_is_quiet = 0.8 * activations["quiet"][m][j] > 1.0 * activations["loud"][m][j]
            expected = 0.8 * quiet_rows[j] if winner_is_quiet else loud_rows[j]
            assert torch.allclose(delta[j], expected, atol=1e-5, rtol=1e-6), (m, j)
        assert merged.modules[m].rank == 6  # Σ r_k: exact, no approximation
    wins = merging.co_merge_wins(merged)
    assert wins["unet.a.to_q"]["quiet"] == pytest.approx(0.5)


def test_co_merge_weights_shift_the_contest_and_zero_excludes():
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {"a": {m: torch.full((o,), 2.0) for m, (o, _) in MODULES.items()},
            "b": {m: torch.full((o,), 1.0) for m, (o, _) in MODULES.items()}}
    stats = make_statistics([a, b], acts)
    only_a = merging.co_merge([a, b], [1.0, 1.0], stats)
    b_wins = merging.co_merge([a, b], [1.0, 3.0], stats)
    excluded = merging.co_merge([a, b], [0.0, 1.0], stats)
    for m in MODULES:
        assert torch.allclose(only_a.delta_weight(m), a.delta_weight(m), atol=1e-5)
        assert torch.allclose(b_wins.delta_weight(m), 3.0 * b.delta_weight(m), atol=1e-4)
        assert torch.allclose(excluded.delta_weight(m), b.delta_weight(m), atol=1e-5)


def test_co_merge_element_mode_exact_diffs_and_svd_error_decreases_with_rank():
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {e.name: {m: torch.ones(o) for m, (o, _) in MODULES.items()} for e in (a, b)}
    stats = make_statistics([a, b], acts)
    exact = merging.co_merge([a, b], [1.0, 1.0], stats, granularity="element")
    for m in MODULES:
        da, db = a.delta_weight(m), b.delta_weight(m)
        expected = torch.where(da.abs() >= db.abs(), da, db)
        assert torch.allclose(exact.diffs[m], expected)
    errors = []
    for rank in (1, 3, 6):
        low = merging.co_merge([a, b], [1.0, 1.0], stats, granularity="element", rank=rank)
        errors.append(json.loads(low.metadata["safetydpo_recipe"])["svd_relative_error"])
    assert errors[0] > errors[1] > errors[2] >= 0


def test_statistics_round_trip_and_refuse_other_experts(tmp_path):
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {e.name: {m: torch.rand(o) for m, (o, _) in MODULES.items()} for e in (a, b)}
    stats = make_statistics([a, b], acts)
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStatistics.load(path)
    for name in ("a", "b"):
        for m in MODULES:
            assert torch.equal(loaded.experts[name][m].row_activation, stats.experts[name][m].row_activation)
    changed = make_expert("a", 5)
    with pytest.raises(MergeError, match="other weights"):
        merging.co_merge([changed, b], [1, 1], loaded)
    with pytest.raises(MergeError, match="no entry"):
        merging.co_merge([make_expert("c", 2), b], [1, 1], loaded)


def test_baselines_run_and_dare_is_reproducible():
    experts = [make_expert("a", 0), make_expert("b", 1), make_expert("c", 2)]
    ties = merging.merge_ties(experts, [1, 2, 1], density=0.5)
    assert set(ties.diffs) == set(MODULES)
    from peft.utils import merge_utils

    for m in MODULES:  # the result is peft's TIES on the experts' ΔW, not a rewrite
        expected = merge_utils.ties([e.delta_weight(m) for e in experts], torch.tensor([1.0, 2.0, 1.0]), 0.5, "total")
        assert torch.equal(ties.diffs[m], expected)
    d1 = merging.merge_dare(experts, [1, 1, 1], density=0.5, seed=3)
    d2 = merging.merge_dare(experts, [1, 1, 1], density=0.5, seed=3)
    d3 = merging.merge_dare(experts, [1, 1, 1], density=0.5, seed=4)
    m = "unet.a.to_q"
    assert torch.equal(d1.diffs[m], d2.diffs[m]) and not torch.equal(d1.diffs[m], d3.diffs[m])
    svd = merging.merge_svd(experts, [1, 1, 1], rank=2)
    assert svd.modules[m].rank == 2
    pruned = merging.merge_magnitude_prune(experts, [1, 1, 1], density=0.3, rank=4)
    assert pruned.modules[m].rank == 4
    full_rank = merging.merge_svd(experts, [1, 1, 1], rank=10)
    linear = merging.merge_linear(experts, [1, 1, 1])
    assert relative_error(full_rank.delta_weight(m), linear.delta_weight(m)) < 1e-5


def test_merged_result_saves_loads_and_merges_again(tmp_path):
    a, b, c = make_expert("a", 0), make_expert("b", 1), make_expert("c", 2)
    first = merging.merge_linear([a, b], [1, 1], name="ab")
    path = lora_files.save_expert(first, tmp_path / "ab.safetensors")
    loaded = lora_files.load_expert(path)
    again = merging.merge_linear([loaded, c], [0.5, 1])
    for m in MODULES:
        expected = 0.5 * (a.delta_weight(m) + b.delta_weight(m)) + c.delta_weight(m)
        assert relative_error(again.delta_weight(m), expected) <= 1e-5
    assert json.loads(loaded.metadata["safetydpo_recipe"])["method"] == "linear"


def test_bad_merges_fail_clearly():
    a, b = make_expert("a", 0), make_expert("b", 1)
    with pytest.raises(MergeError, match="no experts"):
        merging.merge_linear([], [])
    with pytest.raises(MergeError, match="≥ 0"):
        merging.merge_linear([a, b], [1, -1])
    with pytest.raises(MergeError, match="weight 0"):
        merging.merge_linear([a, b], [0, 0])
    with pytest.raises(MergeError, match="finite"):
        merging.merge_linear([a, b], [1, float("nan")])
    odd = make_expert("odd", 2, modules={"unet.a.to_q": (12, 11)})
    with pytest.raises(ArchitectureMismatchError, match="unet.a.to_q"):
        merging.merge_linear([a, odd], [1, 1])
    xl = make_expert("xl", 3)
    xl.architecture = "sdxl"
    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        merging.merge_linear([a, xl], [1, 1])
    broken = make_expert("broken", 4)
    broken.modules["unet.a.to_q"].up[0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN/Inf.*unet.a.to_q"):
        merging.merge_linear([a, broken], [1, 1])
    with pytest.raises(MergeError, match="statistics"):
        merging.merge_experts([a, b], [1, 1], "co_merge", statistics=None)
    with pytest.raises(MergeError, match="unknown merge method"):
        merging.merge_experts([a, b], [1, 1], "average")


# -- command line, end to end through files ----------------------------------------------------

def _tiny_pipeline_folder(root):
    """A local diffusers pipeline folder (tiny UNet, CLIP text encoder, tokenizer, scheduler)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    words = ["a", "red", "blue", "square", "gun", "blood"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1,
             **{c + "</w>": i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    vocab.update({c: len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8).save_pretrained(
        root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=8)).save_pretrained(
        root / "text_encoder", safe_serialization=True)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    (root / "prompts.txt").write_text("\n".join(f"a {w} square" for w in words) + "\n")
    return unet


def _attention_expert(unet, name, seed):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for module_name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.endswith(("attn2.to_k", "attn1.to_out.0")):
            modules[f"unet.{module_name}"] = LoraModule(
                torch.randn(2, module.in_features, generator=g) * 0.3,
                torch.randn(module.out_features, 2, generator=g) * 0.3, 4.0)
    return SafetyExpert(name, modules, architecture="unknown", categories=[name])


def _merge_cli():
    return load_script("trainer/merge.py", "safetydpo_merge_cli"), REPO_ROOT / "trainer" / "merge.py"


def test_command_line_computes_statistics_and_co_merges_files(tmp_path, capsys):
    import subprocess
    import sys

    unet = _tiny_pipeline_folder(tmp_path / "model")
    a, b = _attention_expert(unet, "hate", 1), _attention_expert(unet, "violence", 2)
    paths = [str(lora_files.save_expert(e, tmp_path / f"{e.name}.safetensors")) for e in (a, b)]
    cli, script = _merge_cli()
    stats_path = tmp_path / "stats.safetensors"
    assert cli.main(["statistics", *paths, "--model", str(tmp_path / "model"), "--prompts",
                     str(tmp_path / "model" / "prompts.txt"), "--timesteps", "200,800",
                     "--output", str(stats_path)]) == 0
    statistics = CalibrationStatistics.load(stats_path)
    assert statistics.info["prompts"] == 6 and set(statistics.experts) == {"hate", "violence"}

    out = tmp_path / "merged.safetensors"
    assert cli.main([*paths, "--weights", "1,0.5", "--method", "co_merge", "--statistics", str(stats_path),
                     "--output", str(out)]) == 0
    assert "Co-Merge winners" in capsys.readouterr().out
    merged = lora_files.load_expert(out)
    for m in a.modules:
        score_a = statistics.experts["hate"][m].row_activation
        score_b = 0.5 * statistics.experts["violence"][m].row_activation
        expected = torch.where((score_a >= score_b).unsqueeze(1), a.delta_weight(m), 0.5 * b.delta_weight(m))
        assert torch.allclose(merged.delta_weight(m), expected, atol=1e-6)
    recipe = merging.merge_recipe(merged)
    assert recipe["weights"] == {"hate": 1.0, "violence": 0.5}
    assert recipe["statistics_hash"] == statistics.content_hash()

    # Merging the merge again, through the real script from another working directory.
    twice = tmp_path / "twice.safetensors"
    run = subprocess.run([sys.executable, str(script), str(out), paths[1], "--weights", "1,0", "--method", "linear",
                          "--output", str(twice)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    again = lora_files.load_expert(twice)
    for m in a.modules:
        assert torch.allclose(again.delta_weight(m), merged.delta_weight(m), atol=1e-6)

    # Co-Merge without statistics or a model: a clear message, exit code 2, no output file.
    missing = tmp_path / "none.safetensors"
    assert cli.main([*paths, "--method", "co_merge", "--output", str(missing)]) == 2
    assert "needs calibration statistics" in capsys.readouterr().err and not missing.exists()


def test_modules_in_only_some_experts_and_results_with_diffs_merge_again():
    a = make_expert("a", 0)
    b = make_expert("b", 1, modules={"unet.a.to_q": (12, 10), "unet.d.to_v": (8, 10)})
    acts = {"a": {m: torch.full((o,), 1.0) for m, (o, _) in MODULES.items()},
            "b": {"unet.a.to_q": torch.full((12,), 2.0), "unet.d.to_v": torch.full((8,), 0.1)}}
    stats = make_statistics([a, b], acts)
    merged = merging.co_merge([a, b], [1, 1], stats)
    assert torch.allclose(merged.delta_weight("unet.a.to_q"), b.delta_weight("unet.a.to_q"), atol=1e-5)
    assert torch.allclose(merged.delta_weight("unet.d.to_v"), b.delta_weight("unet.d.to_v"), atol=1e-5)
    assert torch.allclose(merged.delta_weight("unet.b.to_k"), a.delta_weight("unet.b.to_k"), atol=1e-5)
    assert merging.co_merge_wins(merged)["unet.d.to_v"] == {"b": 1.0}

    # An element-wise result (full diffs) competes again in a row Co-Merge, written as exact diffs.
    element = merging.co_merge([a, b], [1, 1], stats, granularity="element", name="ab")
    c = make_expert("c", 2)
    element_acts = {m: torch.where(torch.arange(o) < o // 2, torch.tensor(5.0), torch.tensor(0.0))
                    for m, o in [(m, element.delta_weight(m).shape[0]) for m in element.module_names]}
    stats2 = make_statistics([c], {"c": {m: torch.ones(o) for m, (o, _) in MODULES.items()}})
    stats2.experts["ab"] = {m: ModuleStatistics(element_acts[m], torch.ones(element.delta_weight(m).shape[1]), 4)
                            for m in element.module_names}
    stats2.fingerprints["ab"] = expert_fingerprint(element)
    kept = {m: t.clone() for m, t in element.diffs.items()}
    again = merging.co_merge([element, c], [1, 1], stats2)
    m = "unet.a.to_q"
    top = element.delta_weight(m)[:6]
    assert torch.equal(again.diffs[m][:6], top) and torch.allclose(again.diffs[m][6:], c.delta_weight(m)[6:])
    for method in ("element", "row"):  # merging never changes its inputs
        merging.co_merge([element, c], [0.5, 1], stats2, granularity=method)
        merging.merge_ties([element, c], [0.5, 1])
        merging.merge_dare([element, c], [0.5, 1])
        assert all(torch.equal(element.diffs[k], kept[k]) for k in kept)


def test_reported_svd_error_is_the_real_relative_error():
    experts = [make_expert("a", 0), make_expert("b", 1), make_expert("c", 2)]
    svd = merging.merge_svd(experts, [1, 0.5, 2], rank=2)
    linear = merging.merge_linear(experts, [1, 0.5, 2])
    recipe = merging.merge_recipe(svd)
    residual = sum(float((svd.delta_weight(m) - linear.delta_weight(m)).norm() ** 2) for m in MODULES)
    total = sum(float(linear.delta_weight(m).norm() ** 2) for m in MODULES)
    assert recipe["svd_relative_error"] == pytest.approx((residual / total) ** 0.5, rel=1e-3)
    for m in MODULES:
        real = relative_error(svd.delta_weight(m), linear.delta_weight(m))
        assert recipe["svd_relative_error_per_module"][m] == pytest.approx(real, rel=1e-3)


def test_statistics_that_do_not_fit_are_refused(tmp_path):
    a, b = make_expert("a", 0), make_expert("b", 1)
    acts = {e.name: {m: torch.rand(o) for m, (o, _) in MODULES.items()} for e in (a, b)}
    acts["b"]["unet.b.to_k"] = torch.rand(7)  # measured on another model
    with pytest.raises(ArchitectureMismatchError, match="'b'.*unet.b.to_k"):
        merging.co_merge([a, b], [1, 1], make_statistics([a, b], acts))
    damaged = tmp_path / "stats.safetensors"
    from safetensors.torch import save_file

    save_file({"0/unet.a.to_q/row_activation": torch.ones(12)}, str(damaged),
              metadata={"safetydpo_kind": "co_merge_statistics", "experts": '["a"]', "fingerprints": "{}"})
    with pytest.raises(MergeError, match="damaged"):
        CalibrationStatistics.load(damaged)
    lora = lora_files.save_expert(a, tmp_path / "a.safetensors")
    with pytest.raises(MergeError, match="not a Co-Merge statistics file"):
        CalibrationStatistics.load(lora)


def test_dispatcher_routes_methods_and_rejects_stray_options():
    experts = [make_expert("a", 0), make_expert("b", 1)]
    for method in ("linear", "svd", "ties", "dare", "dare_ties", "magnitude_prune"):
        merged = merging.merge_experts(experts, [1, 1], method, rank=3 if method != "linear" else None, seed=1
                                       if method.startswith("dare") else None)
        assert merging.merge_recipe(merged)["method"] == method
        assert set(merged.module_names) == set(MODULES)
    with pytest.raises(MergeError, match="density"):
        merging.merge_experts(experts, [1, 1], "linear", density=0.3)
    with pytest.raises(MergeError, match="density must be"):
        merging.merge_experts(experts, [1, 1], "ties", density=1.5)
    with pytest.raises(MergeError, match="rank"):
        merging.merge_experts(experts, [1, 1], "svd", rank=-2)
