"""The distillation merge on a tiny real UNet: the student learns each expert where its concept is and the base
model elsewhere, a weight of 0 leaves that concept to the base model, and the network is left as it was."""

from __future__ import annotations

import json

import pytest
import torch

from training_helpers import tiny_bundle

from comfyui_safetydpo.calibration import diffusers_module_lookup, expert_applied
from comfyui_safetydpo.distillation_merge import (DistillationSettings, merge_by_distillation,
                                                  record_distillation_targets)
from comfyui_safetydpo.errors import MergeError, TrainingCancelled
from comfyui_safetydpo.lora_injection import expert_from_lora, inject_lora, lora_parameters, remove_lora
from comfyui_safetydpo import lora_files, merging
from comfyui_safetydpo.merging import merge_recipe
from comfyui_safetydpo.training import TrainingConfig, denoiser_for_bundle
from comfyui_safetydpo.training_config import EncodedPreferenceData

SETTINGS = DistillationSettings(steps=200, rank=8, learning_rate=3e-3, batch_size=16, replay_batch_size=8, draws=6)


def _random_expert(bundle, seed: int, name: str, category: str):
    """A LoRA with a clear effect (random up and down projections), read out as an expert."""
    denoiser = denoiser_for_bundle(bundle)
    config = TrainingConfig(expert_name=name, rank=4, alpha=4.0, categories=(category,))
    inject_lora(bundle.unet, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora_parameters(bundle.unet).values():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    expert = expert_from_lora(bundle.unet, denoiser, config)
    remove_lora(bundle.unet)
    return expert


def _data(bundle, prompt: str, count: int, seed: int, replay_prompt: str = "") -> EncodedPreferenceData:
    generator = torch.Generator().manual_seed(seed)
    images = lambda: torch.rand((count, 3, 8, 8), generator=generator) * 2 - 1  # noqa: E731
    data = EncodedPreferenceData(winner_latents=images(), loser_latents=images(),
                                 embeddings=bundle.encode_prompts([prompt] * count))
    if replay_prompt:
        data.replay_latents = images()
        data.replay_embeddings = bundle.encode_prompts([replay_prompt] * count)
    return data


def _gap(denoiser, targets, rows, student=None, lookup=None):
    """Mean squared difference between the recorded targets and the model's prediction (with ``student``)."""
    with torch.no_grad():
        if student is None:
            prediction = denoiser.predict(targets.noisy[rows], targets.timesteps[rows], targets.embeddings.index(rows))
        else:
            with expert_applied(student, lookup):
                prediction = denoiser.predict(targets.noisy[rows], targets.timesteps[rows],
                                              targets.embeddings.index(rows))
    return float((prediction.float() - targets.targets[rows]).pow(2).mean())


def test_student_learns_each_expert_on_its_concept_and_the_base_model_elsewhere():
    bundle = tiny_bundle()
    lookup = diffusers_module_lookup(bundle.unet)
    denoiser = denoiser_for_bundle(bundle)
    red = _random_expert(bundle, 1, "red", "Violence")
    blue = _random_expert(bundle, 2, "blue", "Hate")
    data = [_data(bundle, "a red square", 8, 10, replay_prompt="a green circle"), _data(bundle, "a blue circle", 8, 11)]
    probe = torch.randn(2, 3, 8, 8)
    before = bundle.predict(probe, torch.tensor([10, 600]), bundle.encode_prompts(["a red square"] * 2)).detach()

    targets = record_distillation_targets(denoiser, [red, blue], [1.0, 0.0], data, lookup, SETTINGS)
    assert targets.info["concept_samples"] == 2 * 2 * 8 * SETTINGS.draws and targets.info["safe_samples"] == 8 * 6
    concept = (~targets.safe).nonzero().flatten()
    red_rows, blue_rows = concept[: len(concept) // 2], concept[len(concept) // 2:]
    safe_rows = targets.safe.nonzero()[:, 0]
    # the teacher differs from the base model where expert red (weight 1) acts, and nowhere else
    assert _gap(denoiser, targets, red_rows) > 1e-3
    assert _gap(denoiser, targets, blue_rows) == pytest.approx(0.0, abs=1e-10)  # weight 0: the base model
    assert _gap(denoiser, targets, safe_rows) == pytest.approx(0.0, abs=1e-10)

    student = merge_by_distillation(denoiser, [red, blue], targets, SETTINGS, name="merged")
    teacher_gap = _gap(denoiser, targets, red_rows)
    assert _gap(denoiser, targets, red_rows, student, lookup) < 0.25 * teacher_gap  # learned red where red is
    # and kept the base model elsewhere much closer than applying the red expert everywhere would
    with torch.no_grad(), expert_applied(red, lookup):
        red_everywhere = float((denoiser.predict(targets.noisy[safe_rows], targets.timesteps[safe_rows],
                                                 targets.embeddings.index(safe_rows)).float()
                                - targets.targets[safe_rows]).pow(2).mean())
    assert _gap(denoiser, targets, safe_rows, student, lookup) < 0.25 * red_everywhere
    assert _gap(denoiser, targets, blue_rows, student, lookup) < 0.25 * red_everywhere

    recipe = merge_recipe(student)
    assert recipe["method"] == "distillation" and recipe["weights"] == {"red": 1.0, "blue": 0.0}
    assert set(recipe["expert_fingerprints"]) == {"red", "blue"} and student.categories == ["Violence", "Hate"]
    assert student.rank == SETTINGS.rank and json.dumps(recipe)
    # the network is left as it was: no LoRA layers, same predictions, gradients as before
    after = bundle.predict(probe, torch.tensor([10, 600]), bundle.encode_prompts(["a red square"] * 2)).detach()
    assert torch.equal(before, after)
    assert not any("lora" in name for name, _ in bundle.unet.named_parameters())


def test_bad_input_and_cancel_fail_clearly_and_leave_the_network_unchanged():
    bundle = tiny_bundle()
    lookup = diffusers_module_lookup(bundle.unet)
    denoiser = denoiser_for_bundle(bundle)
    red = _random_expert(bundle, 1, "red", "Violence")
    no_replay = _data(bundle, "a red square", 4, 3)
    with pytest.raises(MergeError, match="no replay items"):
        record_distillation_targets(denoiser, [red], [1.0], [no_replay], lookup, SETTINGS)
    with pytest.raises(MergeError, match="1 experts, 2 weights"):
        record_distillation_targets(denoiser, [red], [1.0, 1.0], [no_replay], lookup, SETTINGS)
    with pytest.raises(MergeError, match="must be ≥ 1"):
        DistillationSettings(steps=0).validate()
    with_replay = _data(bundle, "a red square", 4, 3, "a green circle")
    targets = record_distillation_targets(denoiser, [red], [1.0], [with_replay], lookup, SETTINGS)
    state = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    flags = [p.requires_grad for p in bundle.unet.parameters()]
    with pytest.raises(TrainingCancelled, match="at step 3"):
        merge_by_distillation(denoiser, [red], targets, SETTINGS, should_stop=iter([False] * 3 + [True]).__next__)
    assert set(bundle.unet.state_dict()) == set(state)
    assert all(torch.equal(bundle.unet.state_dict()[k], v) for k, v in state.items())
    assert [p.requires_grad for p in bundle.unet.parameters()] == flags


def test_command_line_distills_experts_from_their_pairs_dataset(tmp_path, capsys):
    from training_helpers import save_tiny_diffusers_folder

    from shared_helpers import load_script

    from comfyui_safetydpo.expert import LoraModule, SafetyExpert
    from comfyui_safetydpo.model_loading import load_bundle
    from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, ReplayItem, save_image_tensor

    model = save_tiny_diffusers_folder("sd15", tmp_path / "model")
    unet = load_bundle(model).unet
    generator = torch.Generator().manual_seed(0)

    def expert(name, category):
        modules = {f"unet.{n}": LoraModule(torch.randn(2, m.in_features, generator=generator),
                                           torch.randn(m.out_features, 2, generator=generator) * 0.1, 2.0)
                   for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("attn2.to_v")}
        return SafetyExpert(name, modules, architecture="sd15", categories=[category])

    def image(name):
        save_image_tensor(torch.rand(3, 16, 16, generator=generator) * 2 - 1, tmp_path / "pairs" / "images" / name)
        return f"images/{name}"

    pairs = [PreferencePair(f"p{i}", f"unsafe {i}", f"safe {i}", (category,), image(f"w{i}.png"), image(f"l{i}.png"),
                            i, f"concept {i}") for i, category in enumerate(["Violence", "Hate", "Violence"])]
    PreferencePairs(root=tmp_path / "pairs", pairs=pairs).save(tmp_path / "pairs")
    experts = [expert("violence", "Violence"), expert("hate", "Hate")]
    paths = [str(lora_files.save_expert(e, tmp_path / f"{e.name}.safetensors")) for e in experts]
    cli = load_script("trainer/merge.py", "safetydpo_merge_cli_distill")
    common = ["--model", str(model), "--pairs", str(tmp_path / "pairs"), "--steps", "3", "--draws", "1",
              "--batch-size", "2", "--rank", "2"]
    out = tmp_path / "merged.safetensors"
    # no replay items: nothing would say what must stay unchanged
    assert cli.main(["distill", *paths, *common, "--output", str(out)]) == 2
    assert "no replay items" in capsys.readouterr().err and not out.exists()

    replay = [ReplayItem(f"r{i}", f"a calm lake {i}", image(f"r{i}.png"), i) for i in range(2)]
    PreferencePairs(root=tmp_path / "pairs", pairs=pairs, replay=replay).save(tmp_path / "pairs")
    assert cli.main(["distill", *paths, *common, "--weights", "1,0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "distillation step 3/3" in printed and f"wrote {out}" in printed
    merged = lora_files.load_expert(out)
    recipe = merging.merge_recipe(merged)
    assert recipe["method"] == "distillation" and recipe["weights"] == {"violence": 1.0, "hate": 0.0}
    assert recipe["steps"] == 3 and merged.rank == 2 and sorted(merged.categories) == ["Hate", "Violence"]
    assert merged.target_modules == ["to_v"]  # where the experts act

    # an expert for a category the dataset does not hold is named, with what the dataset holds
    stray = str(lora_files.save_expert(expert("nsfw", "Sexual"), tmp_path / "nsfw.safetensors"))
    assert cli.main(["distill", paths[0], stray, *common, "--output", str(tmp_path / "never.safetensors")]) == 2
    assert "expert 'nsfw' is for ['Sexual']" in capsys.readouterr().err
    assert not (tmp_path / "never.safetensors").exists()
