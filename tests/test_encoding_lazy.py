"""Encoding on first use (what ``train_expert`` does) and the skipped reference pass of a fresh LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training_helpers import colour_pairs, tiny_bundle

from comfyui_safetydpo import training, training_loop
from comfyui_safetydpo.encoding_cache import LazyEncodedPreferenceData, encode_preference_pairs
from comfyui_safetydpo.errors import DatasetError
from comfyui_safetydpo.pairs import save_image_tensor
from comfyui_safetydpo.training import (TrainingConfig, denoiser_for_bundle, inject_lora, lora_is_identity,
                                        lora_parameters, train_lora)


def test_lazy_data_encodes_only_what_batches_use_and_equals_the_eager_encoding(tmp_path):
    bundle = tiny_bundle()
    pairs = colour_pairs(tmp_path / "pairs", 6, replay=2)
    eager = encode_preference_pairs(bundle, pairs)
    lazy = encode_preference_pairs(bundle, pairs, tmp_path / "cache", lazy=True)
    assert isinstance(lazy, LazyEncodedPreferenceData) and len(lazy) == 6
    assert lazy.encoder.encoded_images == 0  # nothing encoded up front
    rows = torch.tensor([4, 1])
    assert torch.equal(lazy.winner_latents[rows], eager.winner_latents[rows])
    assert torch.equal(lazy.loser_latents[rows], eager.loser_latents[rows])
    assert torch.equal(lazy.embeddings.index(rows).encoder_hidden_states,
                       eager.embeddings.index(rows).encoder_hidden_states)
    assert lazy.encoder.encoded_images == 4  # winner and loser of the two rows, once
    lazy.loser_latents[rows]
    assert lazy.encoder.encoded_images == 4  # cached in memory
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # the disk cache waits for the whole set
    full = lazy.materialize()
    assert lazy.encoder.encoded_images == 6 * 2 + 2
    for name in ("winner_latents", "loser_latents", "replay_latents"):
        assert torch.equal(getattr(full, name), getattr(eager, name)), name
    assert torch.equal(full.replay_embeddings.encoder_hidden_states, eager.replay_embeddings.encoder_hidden_states)
    cached = encode_preference_pairs(bundle, pairs, tmp_path / "cache", lazy=True)
    assert not isinstance(cached, LazyEncodedPreferenceData)  # complete cache file: read back, not re-encoded
    assert torch.equal(cached.winner_latents, eager.winner_latents)


def test_lazy_data_reports_bad_files_before_training(tmp_path):
    bundle = tiny_bundle()
    mixed = colour_pairs(tmp_path / "mixed", 2)
    save_image_tensor(torch.zeros(3, 16, 16), tmp_path / "mixed" / mixed.pairs[1].rejected_image)
    with pytest.raises(DatasetError, match="mixed sizes"):
        LazyEncodedPreferenceData(bundle, mixed)
    broken = colour_pairs(tmp_path / "broken", 2)
    (tmp_path / "broken" / broken.pairs[0].preferred_image).write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="unreadable image"):
        LazyEncodedPreferenceData(bundle, broken)


@pytest.mark.parametrize("replay", [0, 3])
def test_fresh_lora_step_without_the_reference_pass_equals_the_step_with_it(tmp_path, monkeypatch, replay):
    """At B = 0 the reference is the trained pass itself: same loss and same gradients, one pass fewer."""
    bundle = tiny_bundle()
    data = encode_preference_pairs(bundle, colour_pairs(tmp_path / "pairs", 4, replay=replay))
    config = TrainingConfig(batch_size=2, preservation_weight=1.0 if replay else 0.0, replay_batch_size=2,
                            sft_weight=0.5)
    denoiser = denoiser_for_bundle(bundle)
    inject_lora(bundle.unet, config)
    assert lora_is_identity(bundle.unet)
    calls = []
    predict = denoiser.predict
    denoiser.predict = lambda *args: calls.append(1) or predict(*args)
    results = {}
    for reuse in (True, False):
        monkeypatch.setattr(training_loop, "lora_is_identity", lambda module, reuse=reuse: reuse)
        calls.clear()
        loss, metrics = training_loop._objective(denoiser, data, config, [0, 3], torch.Generator().manual_seed(1),
                                                 torch.device("cpu"), 0, 1000)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_parameters(bundle.unet).items()}
        bundle.unet.zero_grad(set_to_none=True)
        results[reuse] = (loss.detach(), grads, len(calls))
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-7)
    for name, grad in results[False][1].items():
        assert torch.allclose(results[True][1][name], grad, rtol=1e-4, atol=1e-8), name
    # one model call per pass (the replay items share the pairs' call): without the reference pass, one call
    assert (results[True][2], results[False][2]) == (1, 2)
    with torch.no_grad():
        next(p for n, p in bundle.unet.named_parameters() if "lora_B" in n).add_(1e-3)
    assert not lora_is_identity(bundle.unet)


def test_train_expert_runs_on_lazily_encoded_pairs(tmp_path):
    bundle = tiny_bundle()
    pairs = colour_pairs(tmp_path / "pairs", 4)
    config = TrainingConfig(max_steps=1, batch_size=2, checkpoint_every=0)
    result = training.train_expert(bundle, pairs, config, output_dir=tmp_path / "run")
    assert result.steps == 1
    assert not list((tmp_path / "run" / "cache").glob("*.safetensors"))  # 2 of 4 pairs seen: no partial cache
    train_lora(denoiser_for_bundle(bundle), encode_preference_pairs(bundle, pairs, lazy=True),
               TrainingConfig(max_steps=3, batch_size=2, checkpoint_every=0))


def test_prompt_crops_keep_the_changed_words_and_encode_each_image_once(tmp_path):
    bundle = tiny_bundle()
    pairs = colour_pairs(tmp_path / "pairs", 3)
    pairs.pairs[0] = dataclasses.replace(pairs.pairs[0], prompt="a picture of a red square on white",
                                         safe_prompt="a picture of a blue square on white")
    cropped = pairs.with_prompt_crops()
    first = [(p.prompt, p.safe_prompt) for p in cropped.pairs if p.pair_id.startswith("p0")]
    # leading words dropped up to the first changed word ("red"), never past it
    assert first == [("a picture of a red square on white", "a picture of a blue square on white"),
                     ("picture of a red square on white", "picture of a blue square on white"),
                     ("of a red square on white", "of a blue square on white"),
                     ("a red square on white", "a blue square on white"),
                     ("red square on white", "blue square on white")]
    assert [p.pair_id for p in cropped.pairs if p.pair_id.startswith("p1")] == ["p1", "p1~crop1"]
    assert {p.preferred_image for p in cropped.pairs if p.pair_id.startswith("p0")} == {pairs.pairs[0].preferred_image}
    lazy = encode_preference_pairs(bundle, cropped, tmp_path / "cache", lazy=True)
    lazy.materialize()
    assert lazy.encoder.encoded_images == 3 * 2  # crops share their pair's images: each encoded once
    assert TrainingConfig(prompt_crops=True).training_pairs(pairs).pairs == cropped.pairs
    assert TrainingConfig().training_pairs(pairs) is pairs
