"""Apply Safety Experts by Prompt in the real ComfyUI: the gate reads the checkpoint's own CLIP.

Two experts for stand-in concepts ("lantern", "kettle"; their safe rewrites "tulip", "pebble") carry their
reference prompt pairs in their metadata, as training writes them. Prompts in templates the references never
use must turn on exactly their concept's expert; safe prompts must leave the model as it was.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from comfyui_safetydpo import concept_gate, lora_files
from comfyui_safetydpo.errors import MergeError

from test_nodes_comfyui import attention_modules, load_bridge, load_nodes_module, random_expert

SCENES = ("on a wooden table", "in a quiet garden", "near an old window", "beside a river", "under a bright lamp",
          "at the market", "in a small kitchen", "on a mountain path")
CONCEPTS = {"lantern": ("Violence", "tulip"), "kettle": ("Hate", "pebble")}


REFERENCE_TEMPLATES = ("a photo of a {} {}", "{} {}", "there is a {} {}, seen from afar")


def reference_pairs(word: str, safe: str):
    return [(t.format(word, scene), t.format(safe, scene)) for t in REFERENCE_TEMPLATES for scene in SCENES]


@pytest.fixture(scope="module")
def gated_setup(comfy_inprocess, sd15_checkpoint, tmp_path_factory):
    model, clip, _ = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    nodes = load_nodes_module()
    modules = attention_modules(sd15_checkpoint)
    folder = tmp_path_factory.mktemp("gate_experts")
    chain = []
    for seed, (word, (category, safe)) in enumerate(CONCEPTS.items()):
        expert = random_expert(modules, word, "sd15", 20 + seed, categories=[category])
        expert.metadata.update(concept_gate.gate_metadata(
            [type("Pair", (), {"prompt": u, "safe_prompt": s})() for u, s in reference_pairs(word, safe)]))
        path = lora_files.save_expert(expert, folder / f"{word}.safetensors")
        chain.append(nodes.ExpertChoice(lora_files.load_expert(path), 1.0, path.name))
    return nodes, model, clip, tuple(chain)


def test_the_gate_turns_on_only_the_prompts_concept(gated_setup):
    nodes, model, clip, chain = gated_setup
    patches_before = dict(model.patches)
    out = nodes.ApplySafetyExpertsByPrompt.execute(model, clip, chain, "a kettle sitting on a shelf", 0.8)
    gated_model, report = out[0], out[2]
    assert gated_model is not model and model.patches == patches_before
    assert "ON   kettle" in report and "off  lantern" in report
    expected = load_bridge().apply_experts(model, clip, (chain[1],), 0.8)[0]
    assert set(gated_model.patches) == set(expected.patches)
    for key, patches in gated_model.patches.items():
        assert len(patches) == 1 and patches[0][0] == pytest.approx(0.8)
        assert patches[0][1].weights[0].equal(expected.patches[key][0][1].weights[0])  # the kettle expert's factors

    unchanged = nodes.ApplySafetyExpertsByPrompt.execute(model, clip, chain, "a tulip sitting on a shelf", 1.0)
    assert unchanged[0] is model and unchanged[1] is clip
    assert "no expert applied" in unchanged[2]

    both = nodes.ApplySafetyExpertsByPrompt.execute(model, clip, chain, "a lantern and a kettle by the sea", 1.0)
    assert all(len(p) == 2 for p in both[0].patches.values())


def test_gate_accuracy_on_unseen_templates(gated_setup):
    _, _, clip, chain = gated_setup
    bridge = load_bridge()
    gate = bridge.prompt_gate(clip, chain)
    encode = bridge.gate_prompt_encoder(clip)
    templates = ("an old {} on a shelf", "{} in the rain", "a drawing of a {} at night")
    prompts, truth = [], []
    for word, (_, safe) in CONCEPTS.items():
        for template in templates:
            prompts += [template.format(word), template.format(safe)]
            truth += [word, None]
    accuracy = concept_gate.gate_accuracy(gate, encode, prompts, truth)
    assert accuracy["found"] == 1.0 and accuracy["safe_on"] == 0.0, accuracy


def test_the_gate_is_built_once_per_clip_state(gated_setup):
    """Reused for the same CLIP (and a clone without patches); built again when a LoRA patches the CLIP or another
    layer is read, since the states it reads change; never taken from an entry whose encoder is gone."""
    _, _, clip, chain = gated_setup
    bridge = load_bridge()
    gate = bridge.prompt_gate(clip, chain)
    assert bridge.prompt_gate(clip, chain) is gate and bridge.prompt_gate(clip.clone(), chain) is gate
    skipped = clip.clone()
    skipped.clip_layer(-2)
    assert bridge.prompt_gate(skipped, chain) is not gate
    patched = clip.clone()
    name, weight = next((k, v) for k, v in patched.patcher.model.state_dict().items() if k.endswith("q_proj.weight"))
    assert patched.add_patches({name: ("diff", (torch.zeros_like(weight),))}) == [name]
    assert bridge.prompt_gate(patched, chain) is not gate
    gone = torch.nn.Linear(1, 1)
    dead = weakref.ref(gone)
    del gone
    key = next(k for k, (_, cached) in bridge._GATES.items() if cached is bridge.prompt_gate(clip, chain))
    bridge._GATES[key] = (dead, "a gate built for an encoder that no longer exists")
    assert isinstance(bridge.prompt_gate(clip, chain), concept_gate.ConceptGate)


def test_experts_without_references_and_empty_prompts_are_refused(gated_setup, sd15_checkpoint, tmp_path):
    nodes, model, clip, chain = gated_setup
    bare = nodes.ExpertChoice(random_expert(attention_modules(sd15_checkpoint), "bare", "sd15", 30,
                                            categories=["Shocking"]), 1.0, "bare.safetensors")
    with pytest.raises(MergeError, match="'bare' carries no reference prompts"):
        nodes.ApplySafetyExpertsByPrompt.execute(model, clip, (bare,), "anything", 1.0)
    with pytest.raises(MergeError, match="give the prompt you sample with"):
        nodes.ApplySafetyExpertsByPrompt.execute(model, clip, chain, "  ", 1.0)
