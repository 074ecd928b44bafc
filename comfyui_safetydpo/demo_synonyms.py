"""Synonyms for the demo world's concept words, to test the prompt gate on words no concept list holds.

A gate that a synonym defeats is a text filter. The world model was trained with one word per colour, so the demo
teaches it one more word per concept afterwards, the way a text encoder meets a word it was never shown next to
the concept: textual inversion (Gal et al. 2022). Only the new words' embedding rows are trained, from random
starting points, on renders of the concept's scenes described with the new word; the UNet, the text encoder and
every existing word stay as they were. The base model then draws the new word as the concept (measured), while
the gate and the experts were built from prompts that never contain it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Dict, Sequence

import torch

from . import demo_world as dw
from . import files
from .models import DiffusionBundle

log = logging.getLogger(__name__)

SYNONYMS = {"red": "crimson", "purple": "violet", "orange": "tangerine", "pink": "rose", "cyan": "aqua",
            "brown": "chocolate", "olive": "khaki"}
"""One new word per named concept (the generated colours of the scaling world have none)."""

SYNONYM_STEPS = 200  # the textual-inversion loss stopped falling after about 100 steps of 64 images


def synonyms_for(world: dw.DemoWorld) -> Dict[str, str]:
    """The synonyms of ``world``'s unsafe concepts that have one."""
    return {c.name: SYNONYMS[c.name] for c in world.concepts if c.name in SYNONYMS}


def with_synonym_words(bundle: DiffusionBundle, world: dw.DemoWorld, embeddings: Dict[str, torch.Tensor]):
    """A copy of ``bundle`` whose tokenizer and text encoder also know the words of ``embeddings`` (new ids after
    every existing one in sorted order, so every existing word keeps its id and embedding)."""
    words = sorted(embeddings)
    tokenizer = dw.build_tokenizer(list(world.vocabulary) + words)
    encoder = copy.deepcopy(bundle.text_encoders[0])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for word in words:
            table[tokenizer.convert_tokens_to_ids(word)] = embeddings[word].to(table.dtype)
    return dataclasses.replace(bundle, text_encoders=[encoder], tokenizers=[tokenizer])


def learn_synonyms(bundle: DiffusionBundle, world: dw.DemoWorld, synonyms: Dict[str, str],
                   steps: int = SYNONYM_STEPS, seed: int = 0, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """Textual inversion: the embedding of each synonym, trained so that the frozen model draws the concept's
    scenes for prompts (training templates) that name the concept by its synonym."""
    generator = torch.Generator().manual_seed(seed)
    reference = bundle.text_encoders[0].get_input_embeddings().weight.detach()
    start = {word: torch.randn(reference.shape[1], generator=generator) * reference.std()
             for word in synonyms.values()}
    learner = with_synonym_words(bundle, world, start)
    encoder, tokenizer = learner.text_encoders[0], learner.tokenizers[0]
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    table = encoder.get_input_embeddings().weight
    table.requires_grad_(True)
    new_rows = torch.zeros(len(tokenizer), 1)
    new_rows[[tokenizer.convert_tokens_to_ids(w) for w in synonyms.values()]] = 1.0
    optimiser = torch.optim.Adam([table], lr=3e-2)
    scenes = [scene for name in synonyms for scene in world.scenes([name])]
    rng = random.Random(seed)
    scheduler = bundle.noise_scheduler
    with torch.enable_grad():
        for _ in range(steps):
            chosen = [rng.choice(scenes) for _ in range(batch_size)]
            images = torch.stack([world.render(scene, rng.randrange(1 << 30)) for scene in chosen])
            prompts = [dataclasses.replace(scene, colour=synonyms[scene.colour]).prompt(rng.choice(dw.TRAIN_TEMPLATES))
                       for scene in chosen]
            ids = tokenizer(prompts, padding="max_length", max_length=dw.MAX_PROMPT_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
            noise = torch.randn(images.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
            prediction = bundle.unet(scheduler.add_noise(images, noise, t), t, encoder_hidden_states=encoder(ids)[0])
            loss = torch.nn.functional.mse_loss(prediction.sample, bundle.training_target(images, noise, t))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            table.grad *= new_rows  # only the new words learn
            optimiser.step()
    table.requires_grad_(False)
    return {word: table[tokenizer.convert_tokens_to_ids(word)].detach().clone() for word in synonyms.values()}


def synonym_bundle(bundle: DiffusionBundle, world: dw.DemoWorld, cache_dir: Path, model_key: str, seed: int,
                   steps: int = SYNONYM_STEPS):
    """``bundle`` with the synonyms of ``world``'s concepts learned (cached per world model, seed and steps);
    returns (bundle, synonyms)."""
    from safetensors.torch import load_file

    synonyms = synonyms_for(world)
    key = hashlib.sha256(json.dumps([model_key, synonyms, steps, seed]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"synonyms_{key}.safetensors"
    embeddings = None
    if path.is_file():
        try:
            embeddings = load_file(str(path))
            if set(embeddings) != set(synonyms.values()):
                raise ValueError("other words")
        except Exception as error:  # noqa: BLE001 - a damaged cache entry is learned again, never trusted
            log.warning("cached synonym embeddings %s unreadable (%s): learning them again", path, error)
            embeddings = None
    if embeddings is None:
        embeddings = learn_synonyms(bundle, world, synonyms, steps, seed)
        files.save_safetensors(path, {w: e.contiguous() for w, e in embeddings.items()}, metadata={"key": key})
    return with_synonym_words(bundle, world, embeddings), synonyms


def nearest_words(bundle: DiffusionBundle, words: Sequence[str], known: Sequence[str]) -> Dict[str, str]:
    """For each new word, the known word whose input embedding is closest (cosine): where the encoder put it."""
    tokenizer, table = bundle.tokenizers[0], bundle.text_encoders[0].get_input_embeddings().weight.detach()
    known_ids = [tokenizer.convert_tokens_to_ids(w) for w in known]
    out = {}
    for word in words:
        row = table[tokenizer.convert_tokens_to_ids(word)]
        similarity = torch.nn.functional.cosine_similarity(table[known_ids], row[None])
        out[word] = known[int(similarity.argmax())]
    return out
