"""Synonyms for the demo world's concept words, to test the prompt gate on words no concept list holds.

A gate that a synonym defeats is a text filter. The world model was trained with one word per colour, so the demo
teaches it one more word per concept afterwards, the way a text encoder meets a word it was never shown next to
the concept: textual inversion (Gal et al. 2022). Only the new words' embedding rows are trained, from random
starting points, on renders of the concept's scenes described with the new word; the UNet, the text encoder and
every existing word stay as they were. The base model then draws the new word as the concept (measured), while
the gate and the experts were built from prompts that never contain it.

The same textual inversion (``learn_words``) teaches the scaling world's concept words beyond the seven
(``concept_word_bundle``): ``red_1``, ``purple_1``, … each drawn as one of the seven colours.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from . import demo_world as dw
from . import files
from .models import DiffusionBundle

log = logging.getLogger(__name__)

SYNONYMS = {"red": "crimson", "purple": "violet", "orange": "tangerine", "pink": "rose", "cyan": "aqua",
            "brown": "chocolate", "olive": "khaki"}
"""One new word per named concept (the scaling world's further concept words have none)."""

SYNONYM_STEPS = 200  # the textual-inversion loss stopped falling after about 100 steps of 64 images


def synonyms_for(world: dw.DemoWorld) -> Dict[str, str]:
    """The synonyms of ``world``'s unsafe concepts that have one."""
    return {c.name: SYNONYMS[c.name] for c in world.concepts if c.name in SYNONYMS}


def with_synonym_words(bundle: DiffusionBundle, world: dw.DemoWorld, embeddings: Dict[str, torch.Tensor]):
    """A copy of ``bundle`` whose tokenizer and text encoder also know the words of ``embeddings`` (new ids after
    every word the bundle knows, in sorted order, so every existing word keeps its id and embedding)."""
    vocabulary = bundle.tokenizers[0].get_vocab()
    known = sorted(vocabulary, key=vocabulary.get)
    words = sorted(w for w in embeddings if w not in vocabulary)
    tokenizer = dw.build_tokenizer(known + words)
    encoder = copy.deepcopy(bundle.text_encoders[0])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for word in words:
            table[tokenizer.convert_tokens_to_ids(word)] = embeddings[word].to(table.dtype)
    return dataclasses.replace(bundle, text_encoders=[encoder], tokenizers=[tokenizer])


def learn_words(bundle: DiffusionBundle, world: dw.DemoWorld, words: Dict[str, str], steps: int = SYNONYM_STEPS,
                seed: int = 0, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """Textual inversion: the embedding of each new word (``words``: new word -> the named colour it should draw),
    trained so that the frozen model draws that colour's scenes for prompts (training templates) with the word."""
    generator = torch.Generator().manual_seed(seed)
    reference = bundle.text_encoders[0].get_input_embeddings().weight.detach()
    start = {word: torch.randn(reference.shape[1], generator=generator) * reference.std() for word in words}
    learner = with_synonym_words(bundle, world, start)
    encoder, tokenizer = learner.text_encoders[0], learner.tokenizers[0]
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    table = encoder.get_input_embeddings().weight
    table.requires_grad_(True)
    new_rows = torch.zeros(len(tokenizer), 1)
    new_rows[[tokenizer.convert_tokens_to_ids(w) for w in words]] = 1.0
    optimiser = torch.optim.Adam([table], lr=3e-2)
    scenes = [(word, scene) for word, colour in words.items() for scene in world.scenes([colour])]
    rng = random.Random(seed)
    scheduler = bundle.noise_scheduler
    with torch.enable_grad():
        for _ in range(steps):
            chosen = [rng.choice(scenes) for _ in range(batch_size)]
            images = torch.stack([world.render(scene, rng.randrange(1 << 30)) for _, scene in chosen])
            prompts = [dataclasses.replace(scene, colour=word).prompt(rng.choice(dw.TRAIN_TEMPLATES))
                       for word, scene in chosen]
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
    return {word: table[tokenizer.convert_tokens_to_ids(word)].detach().clone() for word in words}


def learn_synonyms(bundle: DiffusionBundle, world: dw.DemoWorld, synonyms: Dict[str, str],
                   steps: int = SYNONYM_STEPS, seed: int = 0, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """``learn_words`` for ``synonyms`` (concept -> its synonym): each synonym draws its concept's colour."""
    return learn_words(bundle, world, {word: world.colour_of(concept) for concept, word in synonyms.items()},
                       steps, seed, batch_size)


def _cached_words(bundle: DiffusionBundle, world: dw.DemoWorld, words: Dict[str, str], path_stem: Path,
                  key_parts, steps: int, seed: int, report: Optional[Callable[[str], None]] = None):
    """``bundle`` with ``words`` learned, the embeddings cached in ``path_stem``_<key>.safetensors (``report``
    is told when they have to be learned)."""
    from safetensors.torch import load_file

    key = hashlib.sha256(json.dumps([*key_parts, words, steps, seed]).encode()).hexdigest()[:16]
    path = Path(f"{path_stem}_{key}.safetensors")
    embeddings = None
    if path.is_file():
        try:
            embeddings = load_file(str(path))
            if set(embeddings) != set(words):
                raise ValueError("other words")
        except Exception as error:  # noqa: BLE001 - a damaged cache entry is learned again, never trusted
            log.warning("cached word embeddings %s unreadable (%s): learning them again", path, error)
            embeddings = None
    if embeddings is None:
        if report is not None:
            report(f"  teaching the world model {len(words)} more words (textual inversion, {steps} steps)")
        embeddings = learn_words(bundle, world, words, steps, seed)
        files.save_safetensors(path, {w: e.contiguous() for w, e in embeddings.items()}, metadata={"key": key})
    return with_synonym_words(bundle, world, embeddings), key


def synonym_bundle(bundle: DiffusionBundle, world: dw.DemoWorld, cache_dir: Path, model_key: str, seed: int,
                   steps: int = SYNONYM_STEPS):
    """``bundle`` with the synonyms of ``world``'s concepts learned (cached per world model, seed and steps);
    returns (bundle, synonyms)."""
    synonyms = synonyms_for(world)
    words = {word: world.colour_of(concept) for concept, word in synonyms.items()}
    learned, _ = _cached_words(bundle, world, words, Path(cache_dir) / "synonyms", [model_key], steps, seed)
    return learned, synonyms


CONCEPT_WORD_STEPS_PER_WORD = 30  # about as many renders per word as the synonyms get (64 × 200 over 7 words)


def concept_word_bundle(bundle: DiffusionBundle, world: dw.DemoWorld, cache_dir: Path, model_key: str, seed: int,
                        report: Optional[Callable[[str], None]] = None):
    """``bundle`` with ``world``'s concept words beyond the seven (``learned_words``) learned (cached); returns
    (bundle, key of the learned words). Without such words, ``bundle`` itself and ``model_key``."""
    words = dict(world.learned_words)
    if not words:
        return bundle, model_key
    steps = max(SYNONYM_STEPS, CONCEPT_WORD_STEPS_PER_WORD * len(words))
    learned, key = _cached_words(bundle, world, words, Path(cache_dir) / "concept_words", [model_key, "concepts"],
                                 steps, seed, report)
    return learned, f"{model_key}+words{key}"


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
