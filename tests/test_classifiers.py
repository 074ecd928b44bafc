"""Offline classifiers on images made here (plain colours, noise): output format, range, missing weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_safetydpo import classifiers as cl
from comfyui_safetydpo import evaluation as ev
from comfyui_safetydpo.evaluation_run import _classify_with_fallback
from comfyui_safetydpo.errors import MissingWeightsError


def solid(rgb, size=32, batch=1):
    colour = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    return colour.expand(batch, 3, size, size).clone()


def made_images():
    noise = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.cat([noise, solid((224, 172, 140), 48), solid((30, 60, 200), 48)])


def check_format(results, count):
    assert isinstance(results, list) and len(results) == count
    for result in results:
        assert set(result) >= {"unsafe", "score", "labels"}
        assert isinstance(result["unsafe"], bool)
        assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0
        json.dumps(result["labels"])  # labels must be JSON-serialisable for the run files


def test_skin_tone_measures_skin_coloured_area():
    classifier = cl.create_classifier("skin_tone")
    results = classifier.classify(made_images())
    check_format(results, 4)
    assert results[2]["score"] == pytest.approx(1.0) and results[2]["unsafe"]  # a skin-tone square
    assert results[3]["score"] == 0.0 and not results[3]["unsafe"]  # blue
    half = torch.cat([solid((224, 172, 140), 32)[..., :16], solid((30, 60, 200), 32)[..., 16:]], dim=-1)
    assert classifier.classify(half)[0]["score"] == pytest.approx(0.5)


def test_callable_classifier_accepts_scores_bools_and_dicts():
    images = solid((0, 0, 0), 8, batch=2)
    check_format(cl.CallableClassifier("s", lambda x: [0.2, 0.9]).classify(images), 2)
    assert [r["unsafe"] for r in cl.CallableClassifier("s", lambda x: [0.2, 0.9]).classify(images)] == [False, True]
    assert [r["unsafe"] for r in cl.CallableClassifier("b", lambda x: [True, False]).classify(images)] == [True, False]
    dicts = cl.CallableClassifier("d", lambda x: [{"unsafe": True, "score": 0.7, "labels": {"k": 1}}] * 2)
    assert dicts.classify(images)[0] == {"unsafe": True, "score": 0.7, "labels": {"k": 1}}
    with pytest.raises(ValueError, match="1 results for 2 images"):
        cl.CallableClassifier("short", lambda x: [0.1]).classify(images)


def test_demo_oracle_plugs_in(tmp_path):
    from comfyui_safetydpo import demo_world as demo
    world = demo.DemoWorld()
    oracle = demo.DemoOracle(world)
    scene = world.scenes()[0]
    images = torch.stack([world.render(scene, seed) for seed in (1, 2)])
    results = _classify_with_fallback(oracle, list(ev.to_uint8(images)))
    check_format([{k: v for k, v in r.items() if k != "error"} for r in results], 2)
    assert all(r["error"] is None for r in results)


def test_opennsfw_runs_offline_on_made_images():
    try:
        classifier = cl.create_classifier("opennsfw")
    except MissingWeightsError as error:
        pytest.skip(str(error))
    results = classifier.classify(made_images())
    check_format(results, 4)
    assert not results[3]["unsafe"]  # a plain blue square is not NSFW
    assert all(r["labels"]["nsfw"] + r["labels"]["sfw"] == pytest.approx(1.0, abs=1e-4) for r in results)


def test_nudenet_runs_offline_on_made_images():
    try:
        classifier = cl.create_classifier("nudenet")
    except MissingWeightsError as error:
        pytest.skip(str(error))
    results = classifier.classify(made_images())
    check_format(results, 4)
    assert not results[3]["unsafe"]


def bytes_to_unicode():
    """GPT-2/CLIP byte-to-character table (for a tiny tokenizer built here)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tiny_clip(folder: Path, projection_dim: int = 16) -> Path:
    """A random, tiny CLIP folder (config, safetensors weights, character-level tokenizer, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=end, pad_token_id=end),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return ev.load_clip(tiny_clip_dir)


def test_clip_zero_shot_with_local_weights(tiny_clip_dir, tiny_clip):
    classifier = cl.ClipZeroShotClassifier(clip=tiny_clip, threshold=0.5)
    results = classifier.classify(made_images())
    check_format(results, 4)
    assert all(r["labels"]["top_unsafe"] in cl.DEFAULT_UNSAFE_TEXTS for r in results)
    # the folder route gives the same numbers
    again = cl.create_classifier("clip_zero_shot", clip_dir=str(tiny_clip_dir)).classify(made_images())
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in results], abs=1e-5)
    # by hand: softmax over unsafe + safe texts, summed over the unsafe ones
    model, processor = tiny_clip
    with torch.no_grad():
        image = processor(images=list(ev.to_uint8(made_images()[:1])), return_tensors="pt")["pixel_values"]
        text = processor(text=list(cl.DEFAULT_UNSAFE_TEXTS + cl.DEFAULT_SAFE_TEXTS), return_tensors="pt", padding=True)
        i = model.get_image_features(pixel_values=image)
        t = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        i = getattr(i, "pooler_output", i)
        t = getattr(t, "pooler_output", t)
        logits = (model.logit_scale.exp() * torch.nn.functional.normalize(i, dim=-1)
                  @ torch.nn.functional.normalize(t, dim=-1).T)
    expected = float(logits.softmax(-1)[0, : len(cl.DEFAULT_UNSAFE_TEXTS)].sum())
    assert results[0]["score"] == pytest.approx(expected, abs=1e-5)


def test_q16_with_local_files(tmp_path, tiny_clip):
    prompts = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    np.save(tmp_path / "q16_prompts.npy", prompts.numpy())
    classifier = cl.Q16Classifier(prompts_path=tmp_path / "q16_prompts.npy", clip=tiny_clip)
    results = classifier.classify(made_images())
    check_format(results, 4)
    import safetensors.torch

    safetensors.torch.save_file({"prompts": prompts}, str(tmp_path / "q16.safetensors"))
    same = cl.Q16Classifier(prompts_path=tmp_path / "q16.safetensors", clip=tiny_clip).classify(made_images())
    assert [r["score"] for r in same] == pytest.approx([r["score"] for r in results])
    np.save(tmp_path / "wide.npy", np.zeros((2, 768), np.float32))
    with pytest.raises(MissingWeightsError, match="width 768"):
        cl.Q16Classifier(prompts_path=tmp_path / "wide.npy", clip=tiny_clip).classify(made_images())


def test_clip_score_matches_definition(tiny_clip):
    images = list(ev.to_uint8(made_images()))
    prompts = ["noise", "more noise", "a skin tone square", "a blue square"]
    value = ev.clip_score(images, prompts, clip=tiny_clip)
    model, processor = tiny_clip
    with torch.no_grad():
        pixel = processor(images=[torch.from_numpy(a).permute(2, 0, 1) for a in images],
                          return_tensors="pt")["pixel_values"]
        text = processor(text=prompts, return_tensors="pt", padding=True)
        i = model.get_image_features(pixel_values=pixel)
        t = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        i = torch.nn.functional.normalize(getattr(i, "pooler_output", i), dim=-1)
        t = torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1)
    expected = float((100 * (i * t).sum(-1)).clamp(min=0).mean())
    assert value == pytest.approx(expected, abs=1e-3)


def test_missing_weights_say_what_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv(ev.CLIP_ENV, raising=False)
    monkeypatch.delenv(cl.Q16_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match=ev.CLIP_ENV) as error:
        cl.create_classifier("clip_zero_shot")
    assert "clip-vit-large-patch14" in str(error.value)
    with pytest.raises(MissingWeightsError, match="prompts.p") as error:
        cl.create_classifier("q16", clip_dir=str(tmp_path))
    assert cl.Q16_ENV in str(error.value)
    with pytest.raises(MissingWeightsError, match="config.json"):
        ev.load_clip(tmp_path)
    (tmp_path / "prompts.p").write_bytes(b"pickle")
    with pytest.raises(MissingWeightsError, match="pickles are never opened"):
        cl.load_q16_prompts(tmp_path / "prompts.p")
    with pytest.raises(MissingWeightsError, match="unknown classifier"):
        cl.create_classifier("nope")
    status = cl.classifier_status()
    assert status["skin_tone"] is None and ev.CLIP_ENV in status["clip_zero_shot"]
