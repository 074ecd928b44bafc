"""The expert nodes in the real ComfyUI: load, calibrate, Co-Merge, apply, save, and bad input.

Experts are built here from the test checkpoint's own attention modules (names and shapes read from
the file), saved with ``lora_files.save_expert`` into the server's ``models/safety_experts/``.
Images are compared bit-exactly from the PNG files ComfyUI wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfyui_harness as harness
from comfyui_safetydpo import lora_files, unet_keys
from comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError, MergeError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert

REPO_ROOT = Path(__file__).resolve().parents[1]
ATTENTION = tuple(f".{a}.to_{p}." for a in ("attn1", "attn2") for p in ("q", "k", "v", "out.0"))


def attention_modules(checkpoint: Path, prefix: str = "model.diffusion_model."):
    """{canonical name: (out, in)} of every attention projection in a checkpoint file."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        shapes = {k[len(prefix):]: handle.get_slice(k).get_shape() for k in handle.keys() if k.startswith(prefix)}
    layout = unet_keys.infer_layout_from_ldm_keys(shapes)
    return {unet_keys.native_to_canonical("diffusion_model." + k[: -len(".weight")], layout): tuple(shape)
            for k, shape in shapes.items() if k.endswith(".weight") and any(a in k + "." for a in ATTENTION)}


def random_expert(modules, name, architecture, seed, rank=4, scale=0.15, categories=None):
    """A LoRA on the given modules with factors large enough to change a 4-step image visibly."""
    generator = torch.Generator().manual_seed(seed)
    loras = {m: LoraModule(torch.randn(rank, i, generator=generator) * scale,
                           torch.randn(o, rank, generator=generator) * scale, float(rank))
             for m, (o, i) in modules.items()}
    return SafetyExpert(name, loras, architecture=architecture, categories=list(categories or [name]))


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def load_nodes_module(name: str = "nodes"):
    """A module of the pack (default nodes.py), imported as ComfyUI imports the custom node folder."""
    return harness.plugin_module(harness.comfyui_path(), name)


def load_bridge():
    """comfyui_bridge.py, the pack's one module that touches ComfyUI."""
    return load_nodes_module("comfyui_bridge")


# -- real server -------------------------------------------------------------------------------

LIVE_CHECKPOINT = "safetydpo_test_sd15_live.safetensors"
_GROUP_NORMS = re.compile(r"model\.diffusion_model\..*(in_layers\.0|out_layers\.0|\bout\.0)\.weight$")


def live_checkpoint(checkpoint: Path) -> Path:
    """The test checkpoint with its UNet's GroupNorm scales at 1 (cached beside it).

    The harness's random builder zeroes 1-d weights whose names lack "norm", which includes the LDM
    GroupNorms ``in_layers.0``, ``out_layers.0`` and ``out.0``: that UNet predicts exactly 0 for every
    input, so no weight change can reach an image. Where the harness already sets them, the file is
    used as it is.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), "pt") as handle:
        norms = [k for k in handle.keys() if _GROUP_NORMS.match(k)]
        if all(handle.get_tensor(k).abs().sum() > 0 for k in norms):
            return checkpoint
    target = checkpoint.parent / "nodes" / LIVE_CHECKPOINT
    if target.is_file():
        return target
    tensors, metadata = lora_files.read_safetensors(checkpoint)
    for key in norms:
        tensors[key] = torch.ones_like(tensors[key])
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(target)
    return target


def live_graph(name: str):
    """A workflow from workflows/ on the live test checkpoint."""
    graph = harness.load_workflow(name)
    for node in graph.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = LIVE_CHECKPOINT
    return graph


@pytest.fixture(scope="module")
def server_with_experts(comfyui_server, sd15_checkpoint):
    """The session server plus two SD1.5 experts, one for another architecture and one that does not fit."""
    comfyui_server.add_model(live_checkpoint(sd15_checkpoint), "checkpoints", LIVE_CHECKPOINT)
    folder = comfyui_server.base_dir / "models" / "safety_experts"
    modules = attention_modules(sd15_checkpoint)
    experts = {
        "hate": random_expert(modules, "test_hate", "sd15", 1, categories=["Hate", "Harassment"]),
        "violence": random_expert(modules, "test_violence", "sd15", 2, categories=["Violence"]),
    }
    for key, expert in experts.items():
        lora_files.save_expert(expert, folder / f"test_expert_{key}.safetensors")
    foreign = random_expert(modules, "test_foreign", "sdxl", 3)
    lora_files.save_expert(foreign, folder / "test_expert_sdxl.safetensors")
    # Right architecture, but modules of a bigger UNet (a second level this test model lacks).
    other = {m.replace("down_blocks.0", "down_blocks.1"): shape for m, shape in modules.items() if "down_blocks.0" in m}
    lora_files.save_expert(random_expert(other, "test_other_model", "sd15", 4),
                           folder / "test_expert_other.safetensors")
    return comfyui_server, experts


def saved_images(server, outputs, *node_ids):
    paths = {}
    for node_id in node_ids:
        found = server.output_images(outputs, node_id)
        assert len(found) == 1 and found[0].is_file(), (node_id, outputs.get(node_id))
        paths[node_id] = found[0]
    return paths


def counter(path: Path) -> int:
    return int(re.search(r"_(\d+)_\.png$", path.name).group(1))


@pytest.fixture(scope="module")
def merge_apply_run(server_with_experts):
    """One run of workflows/merge_apply_api.json: base, patched (Co-Merge), strength 0, saved LoRA."""
    server, experts = server_with_experts
    graph = live_graph("merge_apply_api.json")
    outputs = server.run_workflow(graph, timeout=400)
    return server, experts, graph, outputs


def test_merge_apply_changes_the_image_and_leaves_the_base_model_untouched(merge_apply_run):
    server, _, _, outputs = merge_apply_run
    paths = saved_images(server, outputs, "22", "32", "42", "52")
    base, patched, strength0, base_after = (png(paths[n]) for n in ("22", "32", "42", "52"))
    assert base.std() > 0, "a flat base image means sampling did not run"
    difference = np.abs(patched.astype(int) - base.astype(int))
    assert difference.mean() > 1.0, f"the merged experts barely changed the image (mean |Δ| {difference.mean():.3f})"
    assert np.array_equal(strength0, base), "strength 0 must give the base image exactly"
    # Node 50 samples the unpatched MODEL from a zero latent made from the patched result (LatentMultiply
    # by 0), so it runs after the patched sampler: Apply must have left the input MODEL as it was.
    assert counter(paths["52"]) > counter(paths["32"])
    assert np.array_equal(base_after, base), "the unpatched branch changed after the patched model was sampled"


def test_load_node_reports_categories_and_merge_reports_the_recipe(merge_apply_run):
    _, _, _, outputs = merge_apply_run
    loaded = "\n".join(outputs["11"]["text"])
    assert "test_hate: Hate, Harassment; sd15" in loaded and "test_violence: Violence; sd15" in loaded
    assert "w=0.5" in loaded
    merged = "\n".join(outputs["13"]["text"])
    assert "method co_merge" in merged and "share of units won" in merged


def test_saved_lora_through_core_loraloader_gives_the_apply_image(merge_apply_run):
    server, experts, _, outputs = merge_apply_run
    text = outputs["16"]["text"][0]
    lora_name = re.search(r"models/loras/(\S+\.safetensors)", text).group(1)
    path = server.base_dir / "models" / "loras" / lora_name
    assert path.is_file(), text
    saved = lora_files.load_expert(path)
    assert saved.architecture == "sd15" and saved.categories == ["Hate", "Harassment", "Violence"]
    recipe = json.loads(saved.metadata["safetydpo_recipe"])
    assert recipe["method"] == "co_merge"
    # Row Co-Merge is exact at rank Σ r_k: the file holds both experts' factors.
    assert saved.rank == 8 and set(saved.modules) == set(experts["hate"].modules)

    log_before = len(server.log_text())
    graph = live_graph("save_and_loraloader_api.json")
    graph["5"]["inputs"]["lora_name"] = lora_name
    lora_outputs = server.run_workflow(graph, timeout=300)
    log = server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-2000:]
    via_loader = png(saved_images(server, lora_outputs, "8")["8"])
    via_apply = png(saved_images(server, outputs, "32")["32"])
    assert np.array_equal(via_loader, via_apply), \
        f"LoraLoader image differs from Apply image (max |Δ| {np.abs(via_loader.astype(int) - via_apply).max()})"


def _error_of(server, graph) -> str:
    with pytest.raises(harness.WorkflowError) as caught:
        server.run_workflow(graph, timeout=120)
    return str(caught.value)


def _apply_only_graph(expert_file: str, weight: float = 1.0):
    graph = live_graph("merge_apply_api.json")
    keep = {"1", "2", "3", "4", "30", "31", "32"}
    graph = {k: v for k, v in graph.items() if k in keep}
    graph["10"] = {"class_type": "SafetyDPOLoadExpert", "inputs": {"expert_name": expert_file, "weight": weight}}
    graph["14"] = {"class_type": "SafetyDPOApplyExperts",
                   "inputs": {"model": ["1", 0], "experts": ["10", 0], "strength": 1.0}}
    return graph


def test_foreign_architecture_expert_is_refused_with_the_file_name(server_with_experts):
    server, _ = server_with_experts
    message = _error_of(server, _apply_only_graph("safety_experts/test_expert_sdxl.safetensors"))
    assert "test_expert_sdxl.safetensors" in message and "is for sdxl, but the model is sd15" in message


def test_expert_of_another_model_is_refused(server_with_experts):
    server, _ = server_with_experts
    message = _error_of(server, _apply_only_graph("safety_experts/test_expert_other.safetensors"))
    assert "test_expert_other.safetensors" in message and "does not match this model" in message


def test_all_zero_weights_are_refused(server_with_experts):
    server, _ = server_with_experts
    message = _error_of(server, _apply_only_graph("safety_experts/test_expert_hate.safetensors", weight=0.0))
    assert "weight 0" in message


def test_co_merge_without_statistics_says_what_to_connect(server_with_experts):
    server, _ = server_with_experts
    graph = live_graph("merge_apply_api.json")
    graph = {k: v for k, v in graph.items() if k in {"10", "11", "13", "16"}}
    del graph["13"]["inputs"]["statistics"]
    message = _error_of(server, graph)
    assert "Co-Merge needs calibration statistics" in message


def test_unknown_expert_file_is_rejected_before_running(server_with_experts):
    server, _ = server_with_experts
    message = _error_of(server, _apply_only_graph("safety_experts/../../checkpoints/safetydpo_test_sd15.safetensors"))
    assert "expert_name" in message  # ComfyUI's own check: the value is not in the dropdown


# -- in process: folder rules, no partial patches, SDXL -----------------------------------------

@pytest.fixture(scope="module")
def nodes_in_process(comfy_inprocess, tmp_path_factory):
    """nodes.py imported next to ComfyUI, with its model folders pointed at a temp directory."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("loras", "safety_experts")}
    module = load_nodes_module()
    for name in ("loras", "safety_experts"):
        (root / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(root / name)], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    try:
        yield module, root
    finally:
        for name, value in saved.items():
            if value is None:
                folder_paths.folder_names_and_paths.pop(name, None)
            else:
                folder_paths.folder_names_and_paths[name] = value
        folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="module")
def sd15_model(comfy_inprocess, sd15_checkpoint):
    model, clip, _ = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    return model, clip


@pytest.mark.parametrize("name", ["../secret.safetensors", "safety_experts/../../x.safetensors", "/etc/passwd",
                                  "safety_experts/..\\..\\x.safetensors", "C:/x.safetensors",
                                  "checkpoints/x.safetensors"])
def test_file_names_never_leave_the_model_folders(nodes_in_process, name):
    nodes, _ = nodes_in_process
    with pytest.raises(LoraFormatError, match="dropdown"):
        load_bridge().resolve_model_file(name)


def test_dropdown_lists_both_folders_and_missing_files_name_the_folder(nodes_in_process, sd15_checkpoint):
    nodes, root = nodes_in_process
    modules = attention_modules(sd15_checkpoint)
    lora_files.save_expert(random_expert(modules, "a", "sd15", 5), root / "safety_experts" / "a.safetensors")
    lora_files.save_expert(random_expert(modules, "b", "sd15", 6), root / "loras" / "b.safetensors")
    (root / "safety_experts" / "statistics").mkdir()
    (root / "safety_experts" / "statistics" / "s.safetensors").write_bytes(b"")
    choices = load_bridge().expert_file_choices()
    assert choices == ["safety_experts/a.safetensors", "loras/b.safetensors"]
    assert load_bridge().statistics_file_choices()[:2] == ["none", "statistics/s.safetensors"]
    with pytest.raises(LoraFormatError, match="gone.safetensors' was not found in models/safety_experts"):
        nodes.LoadSafetyExpert.execute("safety_experts/gone.safetensors", 1.0)
    result = nodes.LoadSafetyExpert.execute("loras/b.safetensors", 0.5,
                                           nodes.LoadSafetyExpert.execute("safety_experts/a.safetensors", 1.0)[0])
    chain = result[0]
    assert [(c.expert.name, c.weight) for c in chain] == [("a", 1.0), ("b", 0.5)]
    with pytest.raises(MergeError, match="already in the chain"):
        nodes.LoadSafetyExpert.execute("loras/b.safetensors", 1.0, chain)


def test_a_bad_expert_in_a_chain_leaves_no_partial_patch(nodes_in_process, sd15_model, sd15_checkpoint):
    nodes, _ = nodes_in_process
    model, clip = sd15_model
    modules = attention_modules(sd15_checkpoint)
    good = nodes.ExpertChoice(random_expert(modules, "good", "sd15", 7), 1.0, "good.safetensors")
    wrong = {m: (o, i + 1) for m, (o, i) in list(modules.items())[:3]}
    bad = nodes.ExpertChoice(random_expert(wrong, "bad", "sd15", 8), 1.0, "bad.safetensors")
    patches_before = dict(model.patches)
    with pytest.raises(ArchitectureMismatchError, match="bad.safetensors: .*other shapes"):
        load_bridge().apply_experts(model, clip, (good, bad), 1.0)
    assert model.patches == patches_before
    with pytest.raises(MergeError, match="no safety experts"):
        load_bridge().apply_experts(model, clip, (), 1.0)
    new_model, new_clip = load_bridge().apply_experts(model, clip, (good,), 0.7)
    assert new_model is not model and model.patches == patches_before
    assert len(new_model.patches) == len(modules) and new_clip is clip
    assert all(p[0][0] == pytest.approx(0.7) for p in new_model.patches.values())


def test_text_encoder_expert_needs_the_clip_and_patches_it(nodes_in_process, sd15_model, sd15_checkpoint):
    nodes, _ = nodes_in_process
    model, clip = sd15_model
    text = {f"text_encoder.text_model.encoder.layers.0.self_attn.{p}_proj": (768, 768) for p in ("q", "k", "v")}
    expert = random_expert({**attention_modules(sd15_checkpoint), **text}, "with_te", "sd15", 9)
    choice = nodes.ExpertChoice(expert, 1.0, "with_te.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="connect the checkpoint's CLIP"):
        load_bridge().apply_experts(model, None, (choice,), 1.0)
    new_model, new_clip = load_bridge().apply_experts(model, clip, (choice,), 1.0)
    assert new_clip is not clip and len(new_clip.patcher.patches) == 3 and not clip.patcher.patches


def test_sdxl_model_takes_sdxl_experts_only(nodes_in_process, comfy_inprocess, sdxl_checkpoint, sd15_checkpoint):
    nodes, _ = nodes_in_process
    model = comfy_inprocess.load_diffusion_model(sdxl_checkpoint)
    assert load_bridge().model_architecture(model) == "sdxl"
    modules = attention_modules(sdxl_checkpoint, prefix="")
    expert = nodes.ExpertChoice(random_expert(modules, "xl", "sdxl", 10), 1.0, "xl.safetensors")
    patched, _ = load_bridge().apply_experts(model, None, (expert,), 1.0)
    assert len(patched.patches) == len(modules)
    sd15 = nodes.ExpertChoice(random_expert(attention_modules(sd15_checkpoint), "v1", "sd15", 11), 1.0,
                              "v1.safetensors")
    with pytest.raises(ArchitectureMismatchError,
                       match="v1.safetensors: expert 'v1' is for sd15, but the model is sdxl"):
        load_bridge().apply_experts(model, None, (sd15,), 1.0)


def test_save_node_writes_inside_loras_only_and_sums_a_chain(nodes_in_process, sd15_checkpoint):
    nodes, root = nodes_in_process
    modules = dict(list(attention_modules(sd15_checkpoint).items())[:4])
    a = nodes.ExpertChoice(random_expert(modules, "a", "sd15", 12), 1.0, "a.safetensors")
    b = nodes.ExpertChoice(random_expert(modules, "b", "sd15", 13), 0.5, "b.safetensors")
    for prefix in ("../outside", "/tmp/outside", "sub/../../outside"):
        with pytest.raises(LoraFormatError, match="not a file name inside the model folders"):
            nodes.SaveSafetyLora.execute((a,), prefix)
    first = nodes.SaveSafetyLora.execute((a, b), "merged/safety")[0]
    second = nodes.SaveSafetyLora.execute((a,), "merged/safety")[0]
    assert (first, second) == ("merged/safety_00001_.safetensors", "merged/safety_00002_.safetensors")
    saved = lora_files.load_expert(root / "loras" / first)
    for module in modules:  # the chain is saved as the exact weighted sum
        expected = a.expert.delta_weight(module) + 0.5 * b.expert.delta_weight(module)
        assert torch.allclose(saved.delta_weight(module), expected, atol=1e-6)
    assert sorted(p.name for p in root.rglob("*") if p.is_file() and "outside" in p.name) == []
