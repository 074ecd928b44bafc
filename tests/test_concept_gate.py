"""The prompt gate (concept_gate) on the shipped demo world's own text encoder, and its reference prompts."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_safetydpo import concept_gate, demo, lora_files
from comfyui_safetydpo import demo_world as dw
from comfyui_safetydpo.concepts import PromptPair
from comfyui_safetydpo.errors import MergeError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert


@pytest.fixture(scope="module")
def world_and_encoder(tmp_path_factory):
    world = dw.DemoWorld(7)
    bundle, info = dw.load_or_train_world_model(world, dw.WorldModelSettings(), tmp_path_factory.mktemp("cache"))
    assert info["origin"] == "shipped"
    return world, concept_gate.bundle_prompt_encoder(bundle)


def references(world):
    return {c.name: [(p.prompt, p.safe_prompt) for p in demo.prompt_pairs(world) if c.category in p.categories]
            for c in world.concepts}


def test_gate_finds_each_concept_in_templates_it_never_saw_and_leaves_safe_prompts_off(world_and_encoder):
    world, encode = world_and_encoder
    gate = concept_gate.build_concept_gate(encode, references(world), demo.replay_prompts(world))
    items = [i for i in demo.evaluation_items(world, (11, 12)) if i.split == "held-out template"]
    accuracy = concept_gate.gate_accuracy(gate, encode, [i.prompt for i in items], [i.concept or None for i in items])
    # measured on the world models of seeds 0, 1 and 2: 100 % found, 0 % of safe prompts on (docs/demo.md); with
    # the output states alone (no token embeddings) seed 1 found 89 % of held-out templates
    assert accuracy["found"] >= 0.99 and accuracy["safe_on"] == 0.0, accuracy
    again = concept_gate.build_concept_gate(encode, references(world), demo.replay_prompts(world))
    assert torch.equal(gate.weight, again.weight)  # deterministic
    states, _ = encode(["a red square on a white background"])[0]
    assert gate.gated_weights(states, {"red": 0.7, "pink": 1.0}) == {"red": 0.7, "pink": 0.0}
    assert "ON   red" in gate.describe(states)


def test_gate_refuses_references_that_cannot_mark_a_concept(world_and_encoder):
    _, encode = world_and_encoder
    with pytest.raises(MergeError, match="at least one concept"):
        concept_gate.build_concept_gate(encode, {})
    same = "a red square on a white background"
    with pytest.raises(MergeError, match="'red' has no reference prompt pair whose safe rewrite differs"):
        concept_gate.build_concept_gate(encode, {"red": [(same, same)]})


def tiny_expert(name, categories, metadata=None):
    module = LoraModule(torch.ones(1, 4), torch.ones(4, 1), 1.0)
    return SafetyExpert(name, {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": module},
                        architecture="demo", categories=categories, metadata=dict(metadata or {}))


def test_reference_prompts_travel_in_the_expert_file_or_come_from_a_concept_list(tmp_path):
    pairs = [PromptPair(f"a red thing number {i}", f"a blue thing number {i}", ("Violence",)) for i in range(100)]
    metadata = concept_gate.gate_metadata(pairs)
    stored = json.loads(metadata[concept_gate.GATE_PROMPTS_KEY])
    assert len(stored) == concept_gate.MAX_GATE_PROMPTS and stored == json.loads(
        concept_gate.gate_metadata(pairs)[concept_gate.GATE_PROMPTS_KEY])
    path = lora_files.save_expert(tiny_expert("violence", ["Violence"], metadata), tmp_path / "violence.safetensors")
    loaded = lora_files.load_expert(path)
    assert concept_gate.gate_prompts_from_metadata(loaded.metadata) == [tuple(p) for p in stored]

    bare = tiny_expert("hate", ["Hate"])
    listed = [PromptPair("a purple sign", "a green sign", ("Hate",)), PromptPair("a red sign", "a blue sign",
                                                                                  ("Violence",))]
    found = concept_gate.references_for_experts([loaded, bare], listed)
    assert found["hate"] == [("a purple sign", "a green sign")] and len(found["violence"]) == 64
    with pytest.raises(MergeError, match="'hate' carries no reference prompts.*concept file"):
        concept_gate.references_for_experts([bare], listed[1:])
    broken = tiny_expert("broken", ["Hate"], {concept_gate.GATE_PROMPTS_KEY: "{not json"})
    with pytest.raises(MergeError, match="not a list of prompt pairs"):
        concept_gate.references_for_experts([broken])


def test_changed_tokens_are_a_multiset_difference():
    changed = concept_gate._changed_positions(torch.tensor([5, 7, 7, 9]), torch.tensor([5, 7, 8, 9]))
    assert changed.tolist() == [False, False, True, False]
