"""Pair builder: a tiny diffusers model renders a concept list into a dataset that loads back and that the
trainer's encoder consumes; a stopped build resumes without re-rendering or duplicating pairs; the CLI."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import training_helpers

from comfyui_safetydpo.concepts import PromptPair, parse_pair_lines
from comfyui_safetydpo.errors import DatasetError
from comfyui_safetydpo.pair_builder import build_pairs
from comfyui_safetydpo.pairs import load_image_tensor, load_pairs

WORDS = ["<pad>", "a", "red", "blue", "green", "yellow", "square", "circle", "knife", "flower", "photo", "of"]


def tiny_bundle(seed=0):
    bundle = training_helpers.tiny_bundle(seed, vocabulary=WORDS)
    bundle.unet.eval()
    bundle.text_encoders[0].eval()
    return bundle


CONCEPTS = """
# unsafe | safe | category | concept
a red knife | a red flower | Violence | knife
a photo of a knife | a photo of a flower | Violence | knife
a blue square | a green square | Shocking | square
a yellow circle | a blue circle | Hate
"""


class CountingRender:
    def __init__(self, bundle):
        self.render = functools.partial(bundle.sample, steps=2, guidance_scale=2.0)
        self.calls = []

    def __call__(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return self.render(prompts, seeds)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~20x faster on one thread on a shared, loaded CPU (measured: 3.3 s vs 0.15 s a render)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def _build(render, folder, **kwargs):
    return build_pairs(render, parse_pair_lines(CONCEPTS), folder, images_per_prompt=2, base_seed=10,
                       model_info={"name": "tiny"}, sampler_settings={"steps": 2, "cfg": 2.0}, **kwargs)


def test_build_renders_same_seed_pairs_that_load_back_and_encode(bundle, tmp_path):
    render = CountingRender(bundle)
    steps_seen = []
    dataset = _build(render, tmp_path / "ds", progress=lambda done, total: steps_seen.append((done, total)),
                     replay_prompts=["a green square"])
    assert len(render.calls) == 5 and steps_seen[-1] == (5, 5)
    # One call per prompt pair: N unsafe then N safe prompts with the same seeds.
    prompts, seeds = render.calls[0]
    assert prompts == ["a red knife"] * 2 + ["a red flower"] * 2
    assert seeds[:2] == seeds[2:] and seeds[1] == seeds[0] + 1
    loaded = load_pairs(tmp_path / "ds")
    assert len(loaded) == 8 and len(loaded.replay) == 2
    assert [p.pair_id for p in loaded.pairs] == [p.pair_id for p in dataset.pairs]
    assert loaded.info["complete"] is True and loaded.info["model"] == {"name": "tiny"}
    assert loaded.info["sampler"] == {"steps": 2, "cfg": 2.0} and loaded.info["image_size"] == [8, 8]
    assert loaded.category_counts() == {"Hate": 2, "Shocking": 2, "Violence": 4}
    assert {p.concept for p in loaded.pairs} == {"knife", "square", ""}
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["pairs"][0]["seed"] == seeds[0] and manifest["pairs"][0]["prompt"] == "a red knife"
    assert len({p.seed for p in loaded.pairs}) == 8
    # The saved images are the renderer's output (8-bit PNG rounding) for the recorded seed.
    pair = loaded.pairs[1]
    again = bundle.sample([pair.prompt, pair.safe_prompt], [pair.seed, pair.seed], steps=2, guidance_scale=2.0)
    assert torch.allclose(load_image_tensor(loaded.image_path(pair.rejected_image)), again[0], atol=1 / 127.5 + 1e-4)
    assert torch.allclose(load_image_tensor(loaded.image_path(pair.preferred_image)), again[1], atol=1 / 127.5 + 1e-4)
    assert not torch.equal(again[0], again[1])
    # The trainer's encoder consumes the dataset as it is.
    from comfyui_safetydpo.encoding_cache import encode_preference_pairs

    encoded = encode_preference_pairs(bundle, loaded)
    assert encoded.winner_latents.shape == encoded.loser_latents.shape == (8, 3, 8, 8)
    assert torch.allclose(encoded.loser_latents[1], load_image_tensor(loaded.image_path(pair.rejected_image)))


def test_stopped_build_resumes_without_redoing_or_duplicating(bundle, tmp_path):
    render = CountingRender(bundle)
    stop_after = {"n": 2}
    first = _build(render, tmp_path / "ds", should_stop=lambda: len(render.calls) >= stop_after["n"])
    assert len(render.calls) == 2 and len(first) == 4 and first.info["complete"] is False
    assert len(load_pairs(tmp_path / "ds")) == 4  # what was finished is a usable dataset already
    second = _build(render, tmp_path / "ds")
    assert len(render.calls) == 4, "the resumed build rendered only the two missing prompt pairs"
    assert [c[0][0] for c in render.calls[2:]] == ["a blue square", "a yellow circle"]
    ids = [p.pair_id for p in second.pairs]
    assert len(ids) == len(set(ids)) == 8 and second.info["complete"] is True
    # Same pixels as an uninterrupted build.
    whole = _build(CountingRender(bundle), tmp_path / "whole")
    for a, b in zip(load_pairs(tmp_path / "ds").pairs, whole.pairs):
        assert a == b
        assert torch.equal(load_image_tensor(tmp_path / "ds" / a.rejected_image),
                           load_image_tensor(tmp_path / "whole" / b.rejected_image))
    # Nothing left to do: no render call. A damaged image: only its prompt pair is rendered again.
    _build(render, tmp_path / "ds")
    assert len(render.calls) == 4
    (tmp_path / "ds" / second.pairs[5].preferred_image).write_bytes(b"not a png")
    _build(render, tmp_path / "ds")
    assert len(render.calls) == 5 and render.calls[-1][0][0] == "a blue square"
    assert len(load_pairs(tmp_path / "ds")) == 8


def test_other_settings_or_prompts_in_the_same_folder_are_refused(bundle, tmp_path):
    render = CountingRender(bundle)
    _build(render, tmp_path / "ds")
    with pytest.raises(DatasetError, match="steps.*choose a new output folder"):
        build_pairs(render, parse_pair_lines(CONCEPTS), tmp_path / "ds", images_per_prompt=2, base_seed=10,
                    model_info={"name": "tiny"}, sampler_settings={"steps": 3, "cfg": 2.0})
    # Another list into the same folder (same settings): only the new pair is rendered, the old ones are kept.
    other = [PromptPair("a green circle", "a blue circle", ("Hate",))]
    calls = len(render.calls)
    grown = build_pairs(render, other, tmp_path / "ds", images_per_prompt=2, base_seed=10,
                        model_info={"name": "tiny"}, sampler_settings={"steps": 2, "cfg": 2.0})
    assert len(render.calls) == calls + 1 and len(grown) == 10 and grown.info["kept_from_earlier_builds"] == 8
    # The same id with other prompts (an edited CoProV2 row) is refused.
    changed = [PromptPair("a green circle", "a blue circle", ("Hate",), source_id="0000001_0")]
    build_pairs(render, changed, tmp_path / "ids", base_seed=10)
    edited = [PromptPair("a red circle", "a blue circle", ("Hate",), source_id="0000001_0")]
    with pytest.raises(DatasetError, match="0000001_0_0.*other prompts"):
        build_pairs(render, edited, tmp_path / "ids", base_seed=10)
    with pytest.raises(DatasetError, match="empty selection"):
        build_pairs(render, [], tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"shape \(2, 8, 8\)"):
        build_pairs(lambda prompts, seeds: torch.zeros(2, 8, 8), other, tmp_path / "bad")


def _tiny_diffusers_folder(path):
    """A tiny SD1.5-like diffusers folder (pixel space, byte-level CLIP tokenizer written here)."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bundle = tiny_bundle()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    tokens = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # CLIP's byte table
    vocab = {t: i for i, t in enumerate(tokens + [t + "</w>" for t in tokens] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "tokenizer").mkdir(parents=True)
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "tokenizer" / "vocab.json"), str(path / "tokenizer" / "merges.txt"),
                              model_max_length=16)
    tokenizer.save_pretrained(path / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    text.save_pretrained(path / "text_encoder")
    bundle.unet.save_pretrained(path / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    return path


def test_command_line_builds_from_a_concept_csv_and_resumes(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    import build_pairs as cli

    model = _tiny_diffusers_folder(tmp_path / "model")
    concepts = tmp_path / "concepts.csv"
    concepts.write_text("unsafe_prompt,safe_prompt,category,concept\n"
                        "a red knife,a red flower,Violence,knife\n"
                        "a blue square,a green square,sexual,square\n"
                        "a yellow circle,a blue circle,Harrasment,circle\n")
    args = ["--model", str(model), "--concepts", str(concepts), "--output", str(tmp_path / "out"),
            "--steps", "2", "--cfg", "1.5", "--images-per-prompt", "2", "--categories", "Violence,Sexual",
            "--device", "cpu"]
    assert cli.main(args) == 0
    loaded = load_pairs(tmp_path / "out")
    assert len(loaded) == 4 and loaded.categories == ["Sexual", "Violence"]
    assert loaded.info["model"]["architecture"] == "sd15" and loaded.info["sampler"]["steps"] == 2
    assert cli.main(args) == 0
    assert "0 prompt units rendered now" in capsys.readouterr().err
    assert cli.main(args[:-4] + ["--categories", "Gore", "--device", "cpu"]) == 2
    assert "unknown category 'Gore'" in capsys.readouterr().err


def test_kept_sampler_latents_stand_in_for_encoding_only_where_they_can_be_trusted(tmp_path):
    """A builder that renders with a VAE keeps the sampler's latents; training with the same VAE reads them and
    encodes no image; a replaced image, another VAE or a damaged latent file falls back to encoding."""
    from comfyui_safetydpo.encoding_cache import encode_preference_pairs
    from comfyui_safetydpo.model_loading import load_bundle
    from comfyui_safetydpo.pairs import sampled_latent_path, save_image_tensor

    bundle = load_bundle(training_helpers.save_tiny_diffusers_folder("sd15", tmp_path / "model"), resolution=16)
    render = functools.partial(bundle.sample, steps=2, guidance_scale=2.0, keep_latents=True)
    built = build_pairs(render, parse_pair_lines(CONCEPTS)[:2], tmp_path / "ds", base_seed=3,
                        replay_prompts=["a green square"])
    assert built.info["latent_space"] == bundle.latent_space() != ""
    loaded = load_pairs(tmp_path / "ds")
    images = [p.rejected_image for p in loaded.pairs] + [p.preferred_image for p in loaded.pairs] + [
        r.image for r in loaded.replay]
    assert len(images) == 5 and all((tmp_path / "ds" / sampled_latent_path(i)).is_file() for i in images)

    def encoded(model, pairs):
        data = encode_preference_pairs(model, pairs, lazy=True)
        return data.materialize(), data.encoder

    data, encoder = encoded(bundle, loaded)
    assert (encoder.encoded_images, encoder.kept_images) == (0, 5)
    pair = loaded.pairs[0]
    again = bundle.sample([pair.prompt, pair.safe_prompt], [pair.seed] * 2, steps=2, guidance_scale=2.0,
                          keep_latents=True)
    assert torch.allclose(data.loser_latents[0], again.latents[0], atol=1e-5)
    assert torch.allclose(data.winner_latents[0], again.latents[1], atol=1e-5)
    assert data.loser_latents.shape[1:] == bundle.encode_images(again.images[:1]).shape[1:]
    # an fp16 load of the same file names the same latent space
    half = load_bundle(tmp_path / "model", resolution=16, dtype=torch.float16)
    assert half.latent_space() == bundle.latent_space()

    # a replaced image is encoded, not matched to the latent of the image it replaced
    path = loaded.image_path(pair.rejected_image)
    replacement = -load_image_tensor(path)
    save_image_tensor(replacement, path)
    data, encoder = encoded(bundle, loaded)
    assert (encoder.encoded_images, encoder.kept_images) == (1, 4)
    assert torch.allclose(data.loser_latents[0], bundle.encode_images(load_image_tensor(path)[None])[0], atol=1e-5)
    # another VAE: every image is encoded
    other = load_bundle(training_helpers.save_tiny_diffusers_folder("sd15", tmp_path / "other", seed=1),
                        resolution=16)
    assert other.latent_space() != bundle.latent_space()
    assert encoded(other, loaded)[1].encoded_images == 5
    # a damaged latent file is ignored
    (tmp_path / "ds" / sampled_latent_path(pair.preferred_image)).write_bytes(b"not a safetensors file")
    assert (encoded(bundle, loaded)[1].encoded_images, encoded(bundle, loaded)[1].kept_images) == (2, 3)
    # renderers without latents (pixel-space models) keep none
    plain = build_pairs(functools.partial(tiny_bundle().sample, steps=2, guidance_scale=2.0, keep_latents=True),
                        parse_pair_lines(CONCEPTS)[:1], tmp_path / "pixels")
    assert "latent_space" not in plain.info and not (tmp_path / "pixels" / "latents").exists()
