"""The demo world: renderer, oracle, tokenizer, concepts and the model cache."""

import json


import pytest
import torch

from comfyui_safetydpo import demo_world as dw


def test_renderer_is_deterministic_and_in_range():
    world = dw.DemoWorld()
    scene = dw.Scene("red", "circle", "gray")
    a, b = world.render(scene, 5), world.render(scene, 5)
    assert torch.equal(a, b)
    assert a.shape == (3, dw.IMAGE_SIZE, dw.IMAGE_SIZE)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.equal(a, world.render(scene, 6))  # seeds jitter position, size and colour


def test_safe_rewrite_changes_only_the_concept():
    world = dw.DemoWorld()
    for concept in world.concepts:
        for scene in world.scenes([concept.name]):
            safe = world.safe_rewrite(scene)
            assert (safe.shape, safe.background) == (scene.shape, scene.background)
            assert safe.colour in dw.SAFE_COLOURS and safe.colour not in world.unsafe_colours
            unsafe_prompt, safe_prompt = scene.prompt(dw.TRAIN_TEMPLATES[0]), safe.prompt(dw.TRAIN_TEMPLATES[0])
            assert [w for w in unsafe_prompt.split() if w not in safe_prompt.split()] == [concept.name]


def test_seven_categories_and_concept_words_beyond_them():
    categories = {c.category for c in dw.concepts(7)}
    assert categories == {"Hate", "Sexual", "Violence", "Shocking", "Illegal Activity", "Harassment", "Self-harm"}
    many = dw.concepts(50)
    assert len(many) == 50 and len({c.name for c in many}) == 50 and len({c.category for c in many}) == 50
    assert dw.concepts(50)[:7] == dw.concepts(7)
    named = {c.name: c for c in dw.CONCEPTS}
    for concept in many[7:]:  # a further word for one of the seven colours, with that colour's safe rewrite
        assert concept.drawn_as in named and concept.colour == named[concept.drawn_as].colour
        assert concept.safe_rewrite == named[concept.drawn_as].safe_rewrite and concept.reads_as == concept.drawn_as
    world = dw.DemoWorld(50)
    assert world.unsafe_colours == set(named) and set(world.colours) == set(named) | set(dw.SAFE_COLOURS)
    assert world.vocabulary == dw.DemoWorld(7).vocabulary  # the shipped model's words; concept words come later
    assert dw.settings_key(world, dw.WorldModelSettings()) == dw.settings_key(dw.DemoWorld(7), dw.WorldModelSettings())
    scene = world.scenes(["olive_3"])[0]
    assert world.colour_of("olive_3") == "olive"
    assert dw.DemoOracle(world).read(world.render(scene, 5))["colour"] == "olive"
    assert world.safe_rewrite(scene).colour == "blue"


@pytest.mark.parametrize("count", [7, 50])
def test_oracle_accuracy_on_held_out_renders(count):
    world = dw.DemoWorld(count)
    accuracy = dw.DemoOracle(world).accuracy(seeds=range(900, 902))
    assert accuracy["all"] >= (0.97 if count == 7 else 0.9), accuracy


def test_oracle_flags_unsafe_colours_only():
    world = dw.DemoWorld()
    oracle = dw.DemoOracle(world)
    unsafe = torch.stack([world.render(dw.Scene(c.name, "square", "white"), 1) for c in world.concepts])
    safe = torch.stack([world.render(dw.Scene(c, "square", "white"), 1) for c in dw.SAFE_COLOURS])
    assert [r["unsafe"] for r in oracle.classify(unsafe)] == [True] * len(unsafe)
    assert [r["unsafe"] for r in oracle.classify(safe)] == [False] * len(safe)
    empty = torch.ones(3, dw.IMAGE_SIZE, dw.IMAGE_SIZE)  # plain white: no object at all
    assert oracle.read(empty)["colour"] == "none"


def test_tokenizer_round_trip_and_padding():
    world = dw.DemoWorld()
    tokenizer = dw.build_tokenizer(world.vocabulary)
    prompt = dw.Scene("orange", "circle", "black").prompt(dw.HELD_OUT_TEMPLATES[0])
    ids = tokenizer([prompt], padding="max_length", max_length=dw.MAX_PROMPT_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    assert ids.shape == (1, dw.MAX_PROMPT_TOKENS)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == prompt
    assert tokenizer.unk_token_id not in ids[0].tolist()
    assert ids[0, -1].item() == tokenizer.pad_token_id == 0
    every_template = dw.TRAIN_TEMPLATES + dw.HELD_OUT_TEMPLATES
    longest = max(len(dw.Scene("purple", "square", "white").prompt(t).split()) for t in every_template)
    assert longest <= dw.MAX_PROMPT_TOKENS


def test_model_cache_detects_corruption_and_rebuilds(tmp_path):
    world = dw.DemoWorld(1)
    settings = dw.WorldModelSettings(steps=2, batch_size=4, renders_per_scene=2, width=16)
    bundle, info = dw.load_or_train_world_model(world, settings, tmp_path)
    assert not info["cached"]
    again, info2 = dw.load_or_train_world_model(world, settings, tmp_path)
    assert info2["cached"]
    for a, b in zip(bundle.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    weights = dw.model_folder(world, settings, tmp_path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside the tensor data: loads fine, hash says no
    weights.write_bytes(bytes(data))
    rebuilt, info3 = dw.load_or_train_world_model(world, settings, tmp_path)
    assert not info3["cached"]  # not trusted: trained again (deterministically) and rewritten
    for a, b in zip(bundle.unet.state_dict().values(), rebuilt.unet.state_dict().values()):
        assert torch.equal(a, b)
    manifest = json.loads((weights.parent / "manifest.json").read_text())
    assert manifest["sha256"] == dw.file_sha256(weights)
    weights.write_bytes(b"not a safetensors file")
    _, info4 = dw.load_or_train_world_model(world, settings, tmp_path)
    assert not info4["cached"]


def test_bundle_samples_in_pixel_space():
    world = dw.DemoWorld(1)
    bundle = dw.build_bundle(world, dw.WorldModelSettings(width=16))
    images = bundle.sample(["a red square on a white background"] * 2, [1, 1], steps=2)
    assert images.shape == (2, 3, dw.IMAGE_SIZE, dw.IMAGE_SIZE)
    assert torch.equal(images[0], images[1])  # same seed, same prompt → same image


def test_shipped_world_models_match_their_manifests():
    world = dw.DemoWorld()
    for seed in (0, 1, 2):
        settings = dw.WorldModelSettings(seed=seed)
        folder = dw.shipped_model_folder(world, settings)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["sha256"] == dw.file_sha256(folder / "model.safetensors")
        assert manifest["key"] == dw.settings_key(world, settings)  # made with today's default settings
        assert manifest["command"] == f"python trainer/demo.py --retrain-world --seed {seed} --concepts 7"
    # the quick demo's three-concept world uses the same seven-concept model
    assert (dw.shipped_model_folder(dw.DemoWorld(3), dw.WorldModelSettings())
            == dw.shipped_model_folder(world, dw.WorldModelSettings()))


def test_shipped_model_is_used_and_a_damaged_one_is_ignored(tmp_path):
    world = dw.DemoWorld()
    settings = dw.WorldModelSettings(steps=2, batch_size=4, renders_per_scene=2, width=16)
    shipped = tmp_path / "shipped"
    _, info = dw.load_or_train_world_model(world, settings, tmp_path / "cache", retrain=True, shipped_dir=shipped)
    assert info["origin"] == "trained" and (shipped / "model.safetensors").is_file()
    _, info = dw.load_or_train_world_model(world, settings, tmp_path / "cache", shipped_dir=shipped)
    assert info["origin"] == "shipped"
    data = bytearray((shipped / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (shipped / "model.safetensors").write_bytes(bytes(data))
    _, info = dw.load_or_train_world_model(world, settings, tmp_path / "cache", shipped_dir=shipped)
    assert info["origin"] == "trained"  # never trusted: trained into the cache instead
    _, info = dw.load_or_train_world_model(world, settings, tmp_path / "cache", shipped_dir=shipped)
    assert info["origin"] == "cache"


def test_render_cache_is_keyed_by_the_live_weights(tmp_path):
    from safetensors.torch import load_file

    from comfyui_safetydpo.demo_evaluation import cached_renders, sample_batched

    bundle = dw.build_bundle(dw.DemoWorld(1), dw.WorldModelSettings(width=16))
    prompts, seeds = ["a red square on a white background", "a blue circle on gray"], [3, 4]
    calls = []
    sample = bundle.sample
    bundle.sample = lambda *args, **kwargs: calls.append(args) or sample(*args, **kwargs)
    with cached_renders(tmp_path):
        first = sample_batched(bundle, prompts, seeds, 2, 1.0)
        again = sample_batched(bundle, prompts, seeds, 2, 1.0)
        assert len(calls) == 1 and torch.equal(first, again)  # the second one came from the cache, bit for bit
        sample_batched(bundle, prompts, [3, 5], 2, 1.0)  # another seed is another render
        assert len(calls) == 2
        weight = next(bundle.unet.parameters())
        original = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)  # what applying an expert in place does
        changed = sample_batched(bundle, prompts, seeds, 2, 1.0)
        assert len(calls) == 3 and not torch.equal(changed, first)
        (file,) = [f for f in tmp_path.iterdir() if torch.equal(load_file(str(f))["images"], first)]
        file.write_bytes(b"damaged")
        with torch.no_grad():
            weight.copy_(original)  # restored bit-exactly, as expert_applied does
        assert torch.equal(sample_batched(bundle, prompts, seeds, 2, 1.0), first)  # rendered again, not an error
        assert len(calls) == 4
    sample_batched(bundle, prompts, seeds, 2, 1.0)  # outside the block nothing is cached
    assert len(calls) == 5


def test_gated_rendering_applies_a_shared_expert_once(tmp_path):
    """One expert on all data behind the gate: every concept names the same expert, which is applied once per
    prompt (not summed per concept), and a concept's weight 0 leaves its prompts as the base model draws them."""
    import dataclasses

    from shared_helpers import random_expert

    from comfyui_safetydpo.demo import DemoSettings
    from comfyui_safetydpo.demo_evaluation import EvalItem, render_gated, render_variant
    from comfyui_safetydpo.merging import merge_linear

    world = dw.DemoWorld(2)
    bundle = dw.build_bundle(world, dw.WorldModelSettings(width=16))
    shapes = {f"unet.{name}": tuple(module.weight.shape) for name, module in bundle.unet.named_modules()
              if name.endswith("attn2.to_v")}
    shared = random_expert("all_data", shapes, scale=0.5)
    settings = DemoSettings(sample_steps=2)
    scenes = world.scenes(["red"])[:1] + world.scenes(["purple"])[:1] + world.scenes(["blue"])[:1]
    items = [EvalItem(scene.prompt(dw.TRAIN_TEMPLATES[0]), 7, scene, scene.colour != "blue", scene.colour, "x")
             for scene in scenes]
    base = render_variant(bundle, None, items, settings)
    present = [["red"], ["red", "purple"], []]
    gated = render_gated(bundle, [shared, shared], ["red", "purple"], present, [1.0, 1.0], items, settings, base)
    once = render_variant(bundle, shared, items, settings)
    twice = render_variant(bundle, merge_linear([shared, dataclasses.replace(shared, name="copy")], [1.0, 1.0]),
                           items, settings)
    assert torch.allclose(gated[:2], once[:2], atol=1e-5) and not torch.allclose(gated[1], twice[1], atol=1e-3)
    assert torch.equal(gated[2], base[2])  # the gate found nothing: the base model's image
    zero = render_gated(bundle, [shared, shared], ["red", "purple"], present, [0.0, 1.0], items, settings, base)
    assert torch.equal(zero[0], base[0]) and torch.allclose(zero[1], once[1], atol=1e-5)


def test_render_cache_key_is_the_same_in_every_process():
    """The key must not depend on Python's string hashing (sets in the scheduler config), or no run would hit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("from comfyui_safetydpo import demo_world as dw\n"
              "from comfyui_safetydpo.demo_evaluation import _render_key\n"
              "bundle = dw.build_bundle(dw.DemoWorld(1), dw.WorldModelSettings(width=16))\n"
              "print(_render_key(bundle, ['a red square'], [1], 2, 1.0))\n")
    root = Path(__file__).resolve().parent.parent
    keys = {subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2, 3)}
    assert len(keys) == 1, keys


def test_concept_words_are_learned_by_the_shipped_model_and_keep_every_known_word(tmp_path):
    """The scaling world's extra concept words: textual inversion on the shipped seven-concept model (real steps),
    cached, with every word the model knew keeping its id and embedding."""
    from comfyui_safetydpo import demo_synonyms as ds
    from comfyui_safetydpo.demo import DemoSettings
    from comfyui_safetydpo.demo_evaluation import evaluation_items, render_variant

    world = dw.DemoWorld(8)  # one concept word beyond the seven: red_1, drawn as red
    assert world.learned_words == {"red_1": "red"}
    base, info = dw.load_or_train_world_model(world, dw.WorldModelSettings(), tmp_path)
    assert info["origin"] == "shipped"
    learned, key = ds.concept_word_bundle(base, world, tmp_path, info["key"], seed=0)
    assert key != info["key"] and list(tmp_path.glob("concept_words_*.safetensors"))
    old, new = base.tokenizers[0], learned.tokenizers[0]
    assert {w: new.convert_tokens_to_ids(w) for w in old.get_vocab()} == old.get_vocab()
    old_table = base.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(learned.text_encoders[0].get_input_embeddings().weight[:len(old_table)], old_table)
    again, key_again = ds.concept_word_bundle(base, world, tmp_path, info["key"], seed=0)  # from the cache
    assert key_again == key
    settings = DemoSettings(sample_steps=10)
    items = [i for i in evaluation_items(world, settings.eval_seeds) if i.concept == "red_1"]
    readings = [dw.DemoOracle(world).read(image) for image in render_variant(again, None, items, settings)]
    drawn = sum(r["colour"] == "red" for r in readings) / len(readings)
    assert drawn >= 0.9, drawn  # the new word draws its colour
