"""Training presets: the paper's objective and the measured default, through trainer/train.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import load_train_cli
from test_training_comfyui import inprocess  # noqa: F401  (fixture: the Train node next to ComfyUI)
from training_helpers import save_tiny_diffusers_folder

from comfyui_safetydpo import lora_files, recipes, training
from comfyui_safetydpo.errors import DatasetError, TrainingError
from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, ReplayItem, load_pairs, save_image_tensor


def test_presets_hold_the_papers_objective_and_the_preserving_default():
    paper = recipes.recipe_settings("safetydpo")
    for key, value in training.OFFICIAL_RECIPE.items():
        assert paper[key] == value, key
    assert paper["sft_weight"] == 0 and paper["preservation_weight"] == 0
    preserving = recipes.recipe_settings(recipes.DEFAULT_RECIPE)
    assert recipes.DEFAULT_RECIPE == "preserving"
    assert (preserving["dpo_beta"], preserving["sft_weight"], preserving["preservation_weight"],
            preserving["learning_rate"], preserving["rank"], preserving["alpha"]) == (500.0, 1.0, 5.0, 1e-4, 4, 4.0)
    assert tuple(preserving["target_modules"]) == ("to_q", "to_k", "to_v", "to_out.0")
    assert preserving["prompt_crops"] is True and "prompt_crops" not in recipes.recipe_settings("safetydpo")
    config = training.TrainingConfig(**recipes.with_recipe("preserving", {"learning_rate": 1e-3, "rank": None}))
    config.validate()
    assert config.learning_rate == 1e-3 and config.rank == 4  # an override wins, None leaves the preset
    with pytest.raises(TrainingError, match="unknown training recipe 'dpo'"):
        recipes.recipe_settings("dpo")
    with pytest.raises(DatasetError, match="--replay safe_prompts.txt"):
        recipes.require_replay(config, PreferencePairs(root=".", pairs=[]), "preserving")
    recipes.require_replay(training.TrainingConfig(**recipes.recipe_settings("safetydpo")),
                           PreferencePairs(root=".", pairs=[]), "safetydpo")


def _dataset(root, replay: int):
    pairs, items = [], []
    for i in range(2):
        save_image_tensor(torch.rand(3, 16, 16) * 2 - 1, root / "images" / f"w{i}.png")
        save_image_tensor(torch.rand(3, 16, 16) * 2 - 1, root / "images" / f"l{i}.png")
        pairs.append(PreferencePair(f"p{i}", f"prompt {i}", f"safe {i}", ("Violence",), f"images/w{i}.png",
                                    f"images/l{i}.png", i, "c"))
    for i in range(replay):
        save_image_tensor(torch.rand(3, 16, 16) * 2 - 1, root / "images" / f"r{i}.png")
        items.append(ReplayItem(f"r{i}", f"a lake {i}", f"images/r{i}.png", i))
    PreferencePairs(root=root, pairs=pairs, replay=items).save(root)
    return root


def test_train_command_line_defaults_to_preserving_and_flags_override(tmp_path, capsys):
    model = save_tiny_diffusers_folder("sd15", tmp_path / "model")
    plain = _dataset(tmp_path / "plain", replay=0)
    with_replay = _dataset(tmp_path / "replay", replay=2)
    assert len(load_pairs(with_replay).replay) == 2
    cli = load_train_cli()
    common = ["--model", str(model), "--max-steps", "1", "--batch-size", "1", "--checkpoint-every", "0"]

    # The default recipe on a dataset without replay items: a clear message, exit 2, nothing trained.
    assert cli.main([*common, "--pairs", str(plain), "--output", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert "has no replay items" in error and "recipe 'preserving'" in error and "--replay" in error
    assert not (tmp_path / "none" / "safety_expert.safetensors").exists()

    assert cli.main([*common, "--pairs", str(with_replay), "--output", str(tmp_path / "default")]) == 0
    written = json.loads(capsys.readouterr().out)["experts"]
    recipe = json.loads(lora_files.load_expert(written["safety_expert"]).metadata["safetydpo_recipe"])
    assert (recipe["dpo_beta"], recipe["sft_weight"], recipe["preservation_weight"], recipe["learning_rate"]) == \
        (500.0, 1.0, 5.0, 1e-4)

    # The paper's objective trains on the plain dataset; a flag overrides one of its settings.
    assert cli.main([*common, "--pairs", str(plain), "--output", str(tmp_path / "paper"), "--recipe", "safetydpo",
                     "--learning-rate", "0.001"]) == 0
    written = json.loads(capsys.readouterr().out)["experts"]
    recipe = json.loads(lora_files.load_expert(written["safety_expert"]).metadata["safetydpo_recipe"])
    assert (recipe["dpo_beta"], recipe["sft_weight"], recipe["preservation_weight"], recipe["learning_rate"]) == \
        (5000.0, 0.0, 0.0, 0.001)
    (tmp_path / "paper.yaml").write_text(f"recipe: safetydpo\npairs: {plain}\n")
    assert cli.main(["--config", str(tmp_path / "paper.yaml"), *common, "--output", str(tmp_path / "file")]) == 0
    capsys.readouterr()


def test_train_node_recipe_choice(inprocess):  # noqa: F811
    """In ComfyUI: a preset replaces the objective widgets; 'preserving' without replay items says how to add them."""
    from test_training_comfyui import make_pairs, run_node

    _, nodes, model, clip, vae, base = inprocess
    info = nodes.TrainSafetyExpertDPO.INPUT_TYPES()["optional"]["recipe"]
    assert info[1]["options"] == ["safetydpo", "preserving", "custom"] and info[1]["default"] == "preserving"
    (chain,), _ = run_node(nodes, model, clip, vae, expert_name="paper_recipe", steps=1, checkpoint_every=0,
                           recipe="safetydpo")
    recipe = json.loads(chain.expert.metadata["safetydpo_recipe"])
    assert (recipe["dpo_beta"], recipe["learning_rate"], recipe["alpha"], recipe["preservation_weight"]) == \
        (5000.0, 1e-5, 4.0, 0.0)  # the widgets said 5000, 1e-3, 8, 0.5
    plain = make_pairs(base / "input" / "no_replay")
    dataset = load_pairs(plain)
    PreferencePairs(root=plain, pairs=dataset.pairs, replay=[]).save(plain)
    with pytest.raises(DatasetError, match="no replay items.*replay_prompts"):
        run_node(nodes, model, clip, vae, pairs_folder="no_replay", recipe="preserving")


def test_comfyui_builds_replay_items_and_trains_with_the_default_recipe(comfyui_server):
    """Build Safety Pairs with replay_prompts, then Train Safety Expert with 'preserving' (its settings replace the
    objective widgets, set to other values here), in one real graph."""
    import comfyui_harness as harness

    graph = harness.load_workflow("build_pairs_api.json")
    graph["2"]["inputs"].update(dataset_name="test_replay_pairs", replay_prompts="# must not change\na quiet lake\n")
    graph["4"] = {"class_type": "SafetyDPOTrainExpert", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "pairs_folder": ["2", 0], "expert_name": "replay_expert",
        "category": "", "steps": 1, "learning_rate": 0.05, "batch_size": 1, "rank": 2, "alpha": 1.0, "dpo_beta": 1.0,
        "sft_weight": 0.0, "preservation_weight": 0.0, "seed": 0, "checkpoint_every": 0, "resume": False,
        "recipe": "preserving"}}
    outputs = comfyui_server.run_workflow(graph, timeout=400)
    assert "1 replay items" in outputs["2"]["text"][0]
    dataset = load_pairs(comfyui_server.base_dir / "output" / "safety_pairs" / "test_replay_pairs")
    assert [item.prompt for item in dataset.replay] == ["a quiet lake"]
    expert = lora_files.load_expert(comfyui_server.base_dir / "models" / "safety_experts" / "replay_expert.safetensors")
    recipe = json.loads(expert.metadata["safetydpo_recipe"])
    assert ((recipe["preservation_weight"], recipe["sft_weight"], recipe["dpo_beta"], recipe["rank"])
            == (5.0, 1.0, 500.0, 4))
