"""The least-squares merge in the real ComfyUI: record statistics with ComfyUI's sampler, merge, apply, save.

Two experts on the test checkpoint's cross-attention keys/values (their inputs are the prompt's text
embeddings), one for Hate and one for Violence. One graph records the statistics (each expert applied while
its concept's prompts are sampled, the base model on safe prompts), merges with weights (1, 1) and (0, 1),
applies both and samples a hate, a violence and a safe prompt; a second graph loads the saved merged LoRA with
the core LoraLoader. Images are compared from the PNG files ComfyUI wrote.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_nodes_comfyui import attention_modules, live_checkpoint, png, random_expert, saved_images

import comfyui_harness as harness
from comfyui_safetydpo import lora_files, merging
from comfyui_safetydpo.least_squares_merge import LayerInputStatistics

CHECKPOINT = "safetydpo_test_sd15_live.safetensors"
PROMPTS = {"hate": "a hateful mob with torches and banners", "violence": "a violent street fight with blood",
           "safe": "a quiet mountain lake at sunrise"}
CONCEPTS = (f"Hate: {PROMPTS['hate']}\nHate: a crowd shouting slurs\n"
            f"Violence: {PROMPTS['violence']}\nViolence: a man stabbing another man\n")
SAFE = f"{PROMPTS['safe']}\na bowl of fruit on a table\na red car on a road\n"


def sampler_nodes(graph, node_id: int, model, prompt: str, prefix: str) -> str:
    """Text encode + KSampler + decode + save for one prompt; returns the SaveImage node id."""
    ids = [str(node_id + i) for i in range(4)]
    graph[ids[0]] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}}
    graph[ids[1]] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": [ids[0], 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 11,
        "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    graph[ids[2]] = {"class_type": "VAEDecode", "inputs": {"samples": [ids[1], 0], "vae": ["1", 2]}}
    graph[ids[3]] = {"class_type": "SaveImage", "inputs": {"images": [ids[2], 0], "filename_prefix": prefix}}
    return ids[3]


def merge_node(chain: str, method: str = "least_squares", **extra):
    return {"class_type": "SafetyDPOMergeExperts", "inputs": {
        "experts": [chain, 0], "method": method, "rank": 0, "granularity": "row", "density": 0.5, "drop_seed": 0,
        "name": f"ls_{chain}", "statistics_file": "none", **extra}}


@pytest.fixture(scope="module")
def least_squares_run(comfyui_server, sd15_checkpoint):
    server = comfyui_server
    server.add_model(live_checkpoint(sd15_checkpoint), "checkpoints", CHECKPOINT)
    folder = server.base_dir / "models" / "safety_experts"
    modules = {m: shape for m, shape in attention_modules(sd15_checkpoint).items()
               if m.endswith(("attn2.to_k", "attn2.to_v"))}
    experts = {"hate": random_expert(modules, "ls_hate", "sd15", 21, scale=0.3, categories=["Hate"]),
               "violence": random_expert(modules, "ls_violence", "sd15", 22, scale=0.3, categories=["Violence"])}
    for key, expert in experts.items():
        lora_files.save_expert(expert, folder / f"ls_expert_{key}.safetensors")
    load = lambda name, weight, chain=None: {"class_type": "SafetyDPOLoadExpert", "inputs": {  # noqa: E731
        "expert_name": f"safety_experts/ls_expert_{name}.safetensors", "weight": weight,
        **({"experts": [chain, 0]} if chain else {})}}
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": load("hate", 1.0), "11": load("violence", 1.0, "10"),
        "12": load("hate", 0.0), "13": load("violence", 1.0, "12"),
        "20": {"class_type": "SafetyDPORecordLeastSquaresStatistics", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "experts": ["11", 0], "concept_prompts": CONCEPTS,
            "concept_file": "", "safe_prompts": SAFE, "steps": 3, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "width": 64, "height": 64, "images_per_prompt": 1, "sampling_seed": 11,
            "save_name": "test_least_squares"}},
        "21": merge_node("11", statistics=["20", 0], preserve_weight=1.0),
        "22": merge_node("13", statistics=["20", 0], preserve_weight=1.0),
        "23": {"class_type": "SafetyDPOApplyExperts",
               "inputs": {"model": ["1", 0], "experts": ["21", 0], "strength": 1.0}},
        "24": {"class_type": "SafetyDPOApplyExperts",
               "inputs": {"model": ["1", 0], "experts": ["22", 0], "strength": 1.0}},
        "25": {"class_type": "SafetyDPOSaveLora",
               "inputs": {"experts": ["21", 0], "filename_prefix": "safetydpo_test/ls"}},
        "26": {"class_type": "SafetyDPOApplyExperts",
               "inputs": {"model": ["1", 0], "experts": ["11", 0], "strength": 1.0}},
    }
    saves = {}
    node_id = 100
    for variant, model in (("base", ["1", 0]), ("both", ["23", 0]), ("no_hate", ["24", 0]), ("linear", ["26", 0])):
        for concept, prompt in PROMPTS.items():
            saves[(variant, concept)] = sampler_nodes(graph, node_id, model, prompt, f"ls_{variant}_{concept}")
            node_id += 4
    outputs = server.run_workflow(graph, timeout=600)
    images = {key: png(path) for key, path in
              zip(saves, saved_images(server, outputs, *saves.values()).values())}
    return server, experts, outputs, images


def mean_change(images, variant, concept) -> float:
    return float(np.abs(images[(variant, concept)].astype(int) - images[("base", concept)].astype(int)).mean())


def test_record_merge_apply_acts_on_the_concepts_and_weight_zero_keeps_that_concept(least_squares_run):
    server, experts, outputs, images = least_squares_run
    assert images[("base", "hate")].std() > 0, "a flat base image means sampling did not run"
    assert "least-squares statistics of 2 experts" in outputs["20"]["text"][0]
    assert "method least_squares" in outputs["21"]["text"][0] and "preserve weight λ 1" in outputs["21"]["text"][0]
    change = {(v, c): mean_change(images, v, c) for v in ("both", "no_hate", "linear") for c in PROMPTS}
    # Both experts merged: each concept's image changes as its expert changes it.
    assert change[("both", "hate")] > 1.0 and change[("both", "violence")] > 1.0, change
    # Hate at weight 0: hate prompts stay close to the base model's image, violence is changed as before.
    # Measured (mean |Δ| of 8-bit pixels): hate 3.6 vs 13.7 with both experts (0.26), not 0: hate and violence
    # prompts share text-embedding directions (start and padding tokens) where the violence expert must act.
    assert change[("no_hate", "hate")] < 0.35 * change[("both", "hate")], change
    assert change[("no_hate", "violence")] > 0.8 * change[("both", "violence")], change  # measured 0.98
    # A safe prompt changes less than under the plain sum of the two experts (measured 7.2 vs 16.3).
    assert change[("both", "safe")] < 0.6 * change[("linear", "safe")], change

    saved = server.base_dir / "models" / "safety_experts" / "statistics" / "test_least_squares.safetensors"
    statistics = LayerInputStatistics.load(saved)
    assert set(statistics.projections) == {"ls_hate", "ls_violence"}
    assert (statistics.info["concept_prompts"] == {"ls_hate": 2, "ls_violence": 2}
            and statistics.info["safe_prompts"] == 3)


def test_saved_least_squares_lora_through_core_loraloader_gives_the_apply_image(least_squares_run):
    server, experts, outputs, images = least_squares_run
    lora_name = re.search(r"models/loras/(\S+\.safetensors)", outputs["25"]["text"][0]).group(1)
    saved = lora_files.load_expert(server.base_dir / "models" / "loras" / lora_name)
    assert merging.merge_recipe(saved)["method"] == "least_squares"
    assert saved.rank == 8 and set(saved.modules) == set(experts["hate"].modules)  # exact: rank Σ r_k
    graph = harness.load_workflow("save_and_loraloader_api.json")
    graph["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    graph["2"]["inputs"]["text"] = PROMPTS["hate"]
    graph["5"]["inputs"]["lora_name"] = lora_name
    log_before = len(server.log_text())
    lora_outputs = server.run_workflow(graph, timeout=300)
    log = server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-2000:]
    via_loader = png(saved_images(server, lora_outputs, "8")["8"])
    assert np.array_equal(via_loader, images[("both", "hate")]), "LoraLoader image differs from the Apply image"


def test_statistics_file_of_the_other_kind_is_named(least_squares_run):
    server = least_squares_run[0]
    graph = {"10": {"class_type": "SafetyDPOLoadExpert", "inputs": {
        "expert_name": "safety_experts/ls_expert_hate.safetensors", "weight": 1.0}},
             "11": merge_node("10", method="co_merge", statistics_file="statistics/test_least_squares.safetensors"),
             "12": {"class_type": "SafetyDPOSaveLora", "inputs": {"experts": ["11", 0], "filename_prefix": "never"}}}
    with pytest.raises(harness.WorkflowError) as caught:
        server.run_workflow(graph, timeout=120)
    assert "method 'co_merge' needs Co-Merge calibration statistics" in str(caught.value)
    graph["11"] = merge_node("10")
    with pytest.raises(harness.WorkflowError) as caught:
        server.run_workflow(graph, timeout=120)
    assert "Record Least-Squares Statistics" in str(caught.value)


def test_concept_file_from_the_input_folder_gives_each_expert_its_prompts(comfy_inprocess, tmp_path):
    """Record Least-Squares Statistics' prompt inputs: a concept list in input/ plus 'Category: prompt' lines."""
    import folder_paths
    from test_nodes_comfyui import load_nodes_module

    from comfyui_safetydpo.errors import MergeError
    from comfyui_safetydpo.expert import SafetyExpert

    nodes = load_nodes_module()
    saved = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        (tmp_path / "lists").mkdir()
        (tmp_path / "lists" / "concepts.csv").write_text(
            "unsafe_prompt,safe_prompt,category\na bloody fight,a handshake,Violence\na hateful mob,a crowd,hate\n")
        experts = [SafetyExpert("h", {}, categories=["Hate"]), SafetyExpert("v", {}, categories=["Violence"])]
        per_expert, safe = nodes.least_squares_prompts(experts, "Violence: a knife attack", "lists/concepts.csv",
                                                       "a lake\n# comment\n")
        assert per_expert == {"h": ["a hateful mob"], "v": ["a bloody fight", "a knife attack"]}
        assert safe == ["a handshake", "a crowd", "a lake"]
        with pytest.raises(MergeError, match="must be inside ComfyUI's input folder"):
            nodes.least_squares_prompts(experts, "", "../outside.csv", "a lake")
        with pytest.raises(MergeError, match="was not found in ComfyUI's input folder"):
            nodes.least_squares_prompts(experts, "", "missing.csv", "a lake")
        with pytest.raises(MergeError, match=r"expert 'h' \(categories \['Hate'\]\) has no concept prompts"):
            nodes.least_squares_prompts(experts, "Violence: a knife attack", "", "a lake")
    finally:
        folder_paths.set_input_directory(saved)


def test_comfy_recording_samples_with_the_expert_applied(comfy_inprocess, sd15_checkpoint):
    """ComfyUI's sampler really runs with each expert added: on the same prompts, a layer downstream of the
    expert's change sees other inputs than on the base model, a layer upstream of it the same; weights restored."""
    import torch
    from test_nodes_comfyui import load_bridge

    from comfyui_safetydpo.expert import LoraModule, SafetyExpert

    bridge = load_bridge()
    model, clip, _ = comfy_inprocess.load_checkpoint(live_checkpoint(sd15_checkpoint))
    modules = attention_modules(sd15_checkpoint)
    key = next(m for m in sorted(modules) if m.endswith("attn2.to_k"))
    out = key.replace("to_k", "to_out.0")
    g = torch.Generator().manual_seed(0)
    (o, i), (o2, i2) = modules[key], modules[out]
    loras = {key: LoraModule(torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g), 4.0),
             out: LoraModule(torch.randn(4, i2, generator=g), torch.zeros(o2, 4), 4.0)}  # ΔW only on to_k
    expert = SafetyExpert("probe", loras,
                          architecture="sd15", categories=["Hate"])
    weight = bridge.module_lookup_for(model, clip)(key).weight
    before = weight.detach().clone()
    prompts = ["a hateful mob", "a quiet lake"]
    statistics = bridge.collect_comfy_least_squares_statistics(
        model, clip, [expert], {"probe": prompts}, prompts, steps=2, cfg=1.0, sampler_name="euler",
        scheduler="normal", width=64, height=64, images_per_prompt=1, seed=3)
    assert torch.equal(weight, before)
    assert torch.allclose(statistics.concept_gram[key], statistics.safe_gram[key], rtol=1e-5, atol=1e-6)  # text
    difference = (statistics.concept_gram[out] - statistics.safe_gram[out]).norm() / statistics.safe_gram[out].norm()
    assert difference > 0.2, float(difference)  # measured 0.58; 0 if the expert were not applied
