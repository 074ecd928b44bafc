"""The DPO trainer on a tiny pixel-space model: gradients, learning, exact resume, NaN guard."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from training_helpers import colour_pairs, tiny_bundle

from shared_helpers import load_script

from comfyui_safetydpo import concept_gate, lora_files
from comfyui_safetydpo.encoding_cache import encode_preference_pairs
from comfyui_safetydpo.errors import DatasetError, TrainingCancelled, TrainingError
from comfyui_safetydpo.dpo_loss import per_sample_mse
from comfyui_safetydpo.training import (TrainingConfig, denoiser_for_bundle, inject_lora, lora_parameters,
                                        set_lora_enabled, train_expert, train_lora)

FAST = dict(max_steps=40, batch_size=4, learning_rate=1e-3, rank=4, alpha=4.0, dpo_beta=500.0, checkpoint_every=0)


def test_disabled_lora_is_the_base_network_and_every_lora_tensor_gets_a_gradient(tmp_path):
    bundle = tiny_bundle()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    emb = bundle.encode_prompts(["a red square", "a blue square"])
    base = bundle.predict(x, t, emb).detach()
    inject_lora(bundle.unet, TrainingConfig(**FAST))
    with torch.no_grad():
        for name, p in lora_parameters(bundle.unet).items():
            p.add_(0.1 * torch.randn_like(p))
    set_lora_enabled(bundle.unet, False)
    assert torch.equal(bundle.predict(x, t, emb).detach(), base)
    with torch.no_grad():
        reference = bundle.predict(x, t, emb)
    set_lora_enabled(bundle.unet, True)  # the trap: re-enable before the trained pass
    policy = bundle.predict(x, t, emb)
    assert not torch.allclose(policy, base)
    loss = per_sample_mse(policy, reference + 1).mean()
    loss.backward()
    params = lora_parameters(bundle.unet)
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_pairs_and_replay_share_one_model_call_with_the_same_predictions():
    """``predict_joined``: one call for the pair batch and the replay batch gives each its own predictions, and
    batches that cannot be stacked (other image size) are predicted one by one."""
    from comfyui_safetydpo.training_loop import predict_joined

    bundle = tiny_bundle()
    denoiser = denoiser_for_bundle(bundle)
    calls = []
    predict = denoiser.predict

    def counted(*args):
        calls.append(args[0].shape[0])
        return predict(*args)

    denoiser.predict = counted
    pairs = (torch.randn(4, 3, 8, 8), torch.tensor([1, 200, 400, 999]),
             bundle.encode_prompts(["a red square", "a blue square", "a red circle", "a green square"]))
    replay = (torch.randn(2, 3, 8, 8), torch.tensor([50, 700]), bundle.encode_prompts(["a blue circle", "a square"]))
    with torch.no_grad():
        joined = predict_joined(denoiser, [pairs, replay])
        apart = [predict(*pairs), predict(*replay)]
    assert calls == [6]
    assert [p.shape[0] for p in joined] == [4, 2]
    for a, b in zip(joined, apart):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    calls.clear()
    larger = (torch.randn(2, 3, 16, 16), torch.tensor([50, 700]), replay[2])
    with torch.no_grad():
        assert [p.shape for p in predict_joined(denoiser, [pairs, larger])] == [(4, 3, 8, 8), (2, 3, 16, 16)]
    assert calls == [4, 2]
    assert predict_joined(denoiser, []) == []


def preference_win_rate(bundle, pairs, expert, draws=8):
    """Fraction of (pair, noise) draws where the expert prefers the winner more than the base does."""
    data = encode_preference_pairs(bundle, pairs)
    denoiser = denoiser_for_bundle(bundle)
    g = torch.Generator().manual_seed(123)
    wins, total = 0, 0
    from comfyui_safetydpo.calibration import expert_applied, diffusers_module_lookup

    for _ in range(draws):
        noise = torch.randn(data.winner_latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(data),), generator=g)

        def mse(latents):
            noisy = denoiser.add_noise(latents, noise, t)
            return per_sample_mse(bundle.predict(noisy, t, data.embeddings), denoiser.target(latents, noise, t))

        with torch.no_grad():
            ref = mse(data.winner_latents) - mse(data.loser_latents)
            with expert_applied(expert, diffusers_module_lookup(bundle.unet)):
                new = mse(data.winner_latents) - mse(data.loser_latents)
        wins += int(((new - ref) < 0).sum())
        total += len(data)
    return wins / total


def test_dpo_learns_the_preference_and_generalises_to_held_out_pairs(tmp_path):
    bundle = tiny_bundle()
    train = colour_pairs(tmp_path / "train", 12)
    held_out = colour_pairs(tmp_path / "held_out", 8, seed_offset=100)
    result = train_expert(bundle, train, TrainingConfig(**{**FAST, "max_steps": 60}), output_dir=tmp_path / "run")
    accuracy = sum(h["implicit_accuracy"] for h in result.history[-10:]) / 10
    assert accuracy > 0.9
    assert preference_win_rate(bundle, held_out, result.expert) > 0.8
    # the written expert loads back with the same ΔW and records its recipe
    loaded = lora_files.load_expert(result.expert_path)
    name = result.expert.module_names[0]
    assert torch.allclose(loaded.delta_weight(name), result.expert.delta_weight(name))
    assert '"dpo_beta": 500.0' in loaded.metadata["safetydpo_recipe"]
    # and the pairs it learned from, for the prompt gate (concept_gate)
    stored = concept_gate.gate_prompts_from_metadata(loaded.metadata)
    assert stored and set(stored) <= {(p.prompt, p.safe_prompt) for p in train.pairs}
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 61
    assert all(not any("lora" in n for n, _ in bundle.unet.named_parameters()) for _ in [0])  # LoRA removed


def test_stopped_and_resumed_run_equals_an_uninterrupted_run(tmp_path):
    pairs = colour_pairs(tmp_path / "pairs", 10, replay=4)
    config = TrainingConfig(**{**FAST, "max_steps": 12, "checkpoint_every": 4, "sft_weight": 0.5,
                               "preservation_weight": 1.0, "batch_size": 3})
    straight = train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "a").expert

    calls = {"n": 0}

    def stop_after_six():
        calls["n"] += 1
        return calls["n"] == 7  # checked before step 7: cancel after 6 completed steps

    with pytest.raises(TrainingCancelled):
        train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "b", should_stop=stop_after_six)
    resumed = train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "b", resume=True).expert
    for name in straight.module_names:
        assert torch.allclose(straight.delta_weight(name), resumed.delta_weight(name), atol=1e-6, rtol=0), name


def test_cosine_schedule_warms_up_decays_to_zero_and_resumes_exactly(tmp_path):
    import csv

    from comfyui_safetydpo.training_config import learning_rate_factor

    pairs = colour_pairs(tmp_path / "pairs", 6)
    config = TrainingConfig(**{**FAST, "max_steps": 10, "warmup_steps": 2, "checkpoint_every": 5,
                               "learning_rate_schedule": "cosine"})
    straight = train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "a")
    with open(tmp_path / "a" / "metrics.csv") as handle:
        rates = [float(row["learning_rate"]) for row in csv.DictReader(handle)]
    expected = [FAST["learning_rate"] * learning_rate_factor(step, 2, 10, "cosine") for step in range(10)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert rates[0] < rates[1] == pytest.approx(FAST["learning_rate"]) and rates[-1] < 0.05 * FAST["learning_rate"]
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # after the warm-up it only decays

    calls = {"n": 0}

    def stop_after_seven():
        calls["n"] += 1
        return calls["n"] == 8

    with pytest.raises(TrainingCancelled):
        train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "b", should_stop=stop_after_seven)
    resumed = train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "b", resume=True).expert
    for name in straight.expert.module_names:
        assert torch.allclose(straight.expert.delta_weight(name), resumed.delta_weight(name), atol=1e-6, rtol=0)
    with pytest.raises(TrainingError, match="learning_rate_schedule must be one of constant, cosine"):
        train_expert(tiny_bundle(), pairs, TrainingConfig(**{**FAST, "learning_rate_schedule": "linear"}))


def test_nan_guard_skips_then_stops_with_a_clear_message(tmp_path):
    bundle = tiny_bundle()
    pairs = colour_pairs(tmp_path / "pairs", 4)
    data = encode_preference_pairs(bundle, pairs)
    data.winner_latents[0] = float("nan")
    config = TrainingConfig(**{**FAST, "batch_size": 4, "max_bad_steps": 3})
    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps"):
        train_lora(denoiser_for_bundle(bundle), data, config, output_dir=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_bad_data_and_settings_fail_clearly(tmp_path):
    bundle = tiny_bundle()
    pairs = colour_pairs(tmp_path / "pairs", 3)
    with pytest.raises(DatasetError, match="no pairs"):
        train_expert(bundle, dataclasses.replace(pairs, pairs=[]), TrainingConfig(**FAST))
    (tmp_path / "pairs" / pairs.pairs[0].preferred_image).unlink()
    with pytest.raises(DatasetError, match="missing.*s_0.png"):
        train_expert(bundle, pairs, TrainingConfig(**FAST))
    mixed = colour_pairs(tmp_path / "mixed", 2)
    from comfyui_safetydpo.pairs import save_image_tensor

    save_image_tensor(torch.zeros(3, 16, 16), tmp_path / "mixed" / mixed.pairs[1].rejected_image)
    with pytest.raises(DatasetError, match="mixed sizes"):
        train_expert(bundle, mixed, TrainingConfig(**FAST))
    with pytest.raises(TrainingError, match="all loss weights are 0"):
        train_expert(bundle, colour_pairs(tmp_path / "ok", 2), TrainingConfig(**{**FAST, "dpo_weight": 0}))
    with pytest.raises(DatasetError, match="replay"):
        train_expert(bundle, colour_pairs(tmp_path / "ok2", 2), TrainingConfig(**{**FAST, "preservation_weight": 1}))


def load_train_cli():
    return load_script("trainer/train.py", "safetydpo_train_cli")


def test_command_line_config_file_flags_and_per_category_mode(tmp_path, capsys):
    import json

    from training_helpers import save_tiny_diffusers_folder

    from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, save_image_tensor

    model = save_tiny_diffusers_folder("sd15", tmp_path / "model")
    pairs = []
    for i, category in enumerate(["Violence", "Hate", "Violence"]):
        save_image_tensor(torch.rand(3, 16, 16) * 2 - 1, tmp_path / "pairs" / "images" / f"w{i}.png")
        save_image_tensor(torch.rand(3, 16, 16) * 2 - 1, tmp_path / "pairs" / "images" / f"l{i}.png")
        pairs.append(PreferencePair(f"p{i}", f"prompt {i}", f"safe {i}", (category,), f"images/w{i}.png",
                                    f"images/l{i}.png", i, f"concept {i}"))
    PreferencePairs(root=tmp_path / "pairs", pairs=pairs).save(tmp_path / "pairs")
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {model}\npairs: {tmp_path / 'pairs'}\nmax_steps: 50\nbatch_size: 2\n"
                      "learning_rate: 0.001\ncheckpoint_every: 0\nexpert_name: cli\nrecipe: safetydpo\n")
    cli = load_train_cli()
    assert cli.main(["--config", str(config), "--output", str(tmp_path / "one"), "--max-steps", "2",
                     "--category", "Violence"]) == 0
    written = json.loads(capsys.readouterr().out)["experts"]
    expert = lora_files.load_expert(written["cli"])
    recipe = json.loads(expert.metadata["safetydpo_recipe"])
    assert recipe["max_steps"] == 2 and recipe["batch_size"] == 2  # flag over file, file over default
    assert expert.categories == ["Violence"]
    assert (tmp_path / "one" / "metrics.csv").read_text().count("\n") == 3
    assert cli.main(["--config", str(config), "--output", str(tmp_path / "each"), "--max-steps", "1",
                     "--per-category"]) == 0
    written = json.loads(capsys.readouterr().out)["experts"]
    assert set(written) == {"Hate", "Violence"}
    assert lora_files.load_expert(written["Hate"]).categories == ["Hate"]
    # bad input: a clear message and exit status 2, no traceback
    assert cli.main(["--config", str(config), "--output", str(tmp_path / "x"), "--rank", "0"]) == 2
    assert "rank must be" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("lerning_rate: 1\n")
    assert cli.main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown settings ['lerning_rate']" in capsys.readouterr().err


def test_fp16_scales_the_loss_skips_overflow_steps_and_resumes_exactly(tmp_path, monkeypatch):
    """fp16 autocast goes with a GradScaler (as under accelerate): an overflowing scale is halved without
    counting as a bad step, and the scale is part of the checkpoint (stopped + resumed = straight run)."""
    import json

    from comfyui_safetydpo import training_loop

    monkeypatch.setattr(training_loop, "FP16_INITIAL_SCALE", 2.0 ** 24)  # overflows fp16 at once: must back off
    pairs = colour_pairs(tmp_path / "pairs", 6)
    config = TrainingConfig(**{**FAST, "max_steps": 4, "checkpoint_every": 2, "batch_size": 2,
                               "mixed_precision": "fp16", "max_bad_steps": 2})
    straight = train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "a")
    assert len(straight.history) == 4 and all(math.isfinite(h["loss"]) for h in straight.history)
    state = json.loads((tmp_path / "a" / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert 1.0 < state["grad_scaler"]["scale"] < 2.0 ** 24  # backed off from the overflowing start

    def stop_after_the_first_checkpoint():  # the resumed run must continue with the lowered scale
        return (tmp_path / "b" / "checkpoints" / "latest").is_file()

    with pytest.raises(TrainingCancelled, match="at step 2"):
        train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "b",
                     should_stop=stop_after_the_first_checkpoint)
    resumed = train_expert(tiny_bundle(), pairs, config, output_dir=tmp_path / "b", resume=True).expert
    for name in straight.expert.module_names:
        assert torch.allclose(straight.expert.delta_weight(name), resumed.delta_weight(name), atol=1e-6, rtol=0)
