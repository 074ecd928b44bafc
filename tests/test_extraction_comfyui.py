"""Extract Safety Expert in the real ComfyUI.

A known rank-4 LoRA is fused into the test SD1.5 checkpoint (the "released safe model", a UNet-only
file as ComfyUI's Load Diffusion Model reads it). The node extracts it against the base checkpoint at
rank 4 (ΔW error ≤ 1e-3 against the known LoRA), and the extracted expert, applied to a *different*
fine-tune of the same base (base plus its own perturbation), samples the same latents as that fine-tune
with the original LoRA file through ComfyUI's own LoraLoaderModelOnly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comfyui_safetydpo import extraction, lora_files, unet_keys
from comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError
from test_nodes_comfyui import (LIVE_CHECKPOINT, REPO_ROOT, attention_modules, live_checkpoint,  # noqa: F401
                                nodes_in_process, random_expert, sd15_model)

RANK = 4
SAFE_UNET = "safetydpo_test_safe_unet.safetensors"
FINETUNE_UNET = "safetydpo_test_finetune_unet.safetensors"
KNOWN_LORA = "safetydpo_test_known_lora.safetensors"
OWN_EXPERT = "safetydpo_test_own_expert.safetensors"
PREFIX = "model.diffusion_model."


def _unet_file(state, deltas, layout, path: Path):
    """The checkpoint's UNet (bare LDM keys, as ComfyUI saves UNets) with ΔW added in float32."""
    from safetensors.torch import save_file

    tensors = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    for module, delta in deltas.items():
        key = unet_keys.canonical_to_native(module, layout)[len("diffusion_model."):] + ".weight"
        tensors[key] = (tensors[key].float() + delta).contiguous()
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def extraction_models(comfyui_server, sd15_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("extraction_models")
    base = live_checkpoint(sd15_checkpoint)
    comfyui_server.add_model(base, "checkpoints", LIVE_CHECKPOINT)
    state, _ = lora_files.read_safetensors(base)
    layout = unet_keys.infer_layout_from_ldm_keys([k for k in state if k.startswith(PREFIX)])
    modules = attention_modules(base)
    known = random_expert(modules, "known", "sd15", 21, rank=RANK, categories=["Sexual"])
    deltas = known.delta_weights()
    # The user's own fine-tune: the base plus its own (dense) change of every attention weight.
    generator = torch.Generator().manual_seed(22)
    own = {m: 0.05 * torch.randn(shape, generator=generator) / shape[1] ** 0.5 for m, shape in modules.items()}
    safe = _unet_file(state, deltas, layout, root / SAFE_UNET)
    finetune = _unet_file(state, own, layout, root / FINETUNE_UNET)
    comfyui_server.add_model(safe, "diffusion_models", SAFE_UNET)
    comfyui_server.add_model(finetune, "diffusion_models", FINETUNE_UNET)
    lora_files.save_expert(known, comfyui_server.base_dir / "models" / "loras" / KNOWN_LORA)
    own_expert = random_expert(modules, "own_violence", "sd15", 23, rank=RANK, categories=["Violence"])
    lora_files.save_expert(own_expert, comfyui_server.base_dir / "models" / "safety_experts" / OWN_EXPERT)
    lora_files.save_expert(own_expert, comfyui_server.base_dir / "models" / "loras" / OWN_EXPERT)
    return comfyui_server, base, safe, deltas


def _graph():
    sampler = {"seed": 5, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
               "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["4", 0]}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SAFE_UNET, "weight_dtype": "default"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LIVE_CHECKPOINT}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": FINETUNE_UNET, "weight_dtype": "default"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube on a blue table", "clip": ["2", 1]}},
        "10": {"class_type": "SafetyDPOExtractExpert", "inputs": {
            "safe_model": ["1", 0], "base_model": ["2", 0], "layers": "attention", "output": "lora", "rank": RANK,
            "energy": 0.99, "max_rank": 128, "categories": "sexual, my own concept", "name": "released_safety",
            "weight": 1.0, "save_name": "extracted/released_safety"}},
        "11": {"class_type": "SafetyDPOApplyExperts",
               "inputs": {"model": ["3", 0], "experts": ["10", 0], "strength": 1.0}},
        "12": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["3", 0], "lora_name": KNOWN_LORA,
                                                              "strength_model": 1.0}},
        "20": {"class_type": "KSampler", "inputs": {"model": ["11", 0], **sampler}},
        "21": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 0], "filename_prefix": "extract/extracted"}},
        "30": {"class_type": "KSampler", "inputs": {"model": ["12", 0], **sampler}},
        "31": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "extract/original"}},
        "40": {"class_type": "KSampler", "inputs": {"model": ["3", 0], **sampler}},
        "41": {"class_type": "SaveLatent", "inputs": {"samples": ["40", 0], "filename_prefix": "extract/finetune"}},
        # The example's chain: extracted expert + the user's own expert at weight 0.5, linear merge, apply ...
        "13": {"class_type": "SafetyDPOLoadExpert", "inputs": {"expert_name": f"safety_experts/{OWN_EXPERT}",
                                                               "weight": 0.5, "experts": ["10", 0]}},
        "14": {"class_type": "SafetyDPOMergeExperts", "inputs": {
            "experts": ["13", 0], "method": "linear", "rank": 0, "granularity": "row", "density": 0.5,
            "drop_seed": 0, "name": "merged", "statistics_file": "none"}},
        "15": {"class_type": "SafetyDPOApplyExperts",
               "inputs": {"model": ["3", 0], "experts": ["14", 0], "strength": 1.0}},
        "50": {"class_type": "KSampler", "inputs": {"model": ["15", 0], **sampler}},
        "51": {"class_type": "SaveLatent", "inputs": {"samples": ["50", 0], "filename_prefix": "extract/merged"}},
        # ... against the original LoRA and the own expert through two chained core LoRA loaders.
        "16": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["12", 0], "lora_name": OWN_EXPERT,
                                                              "strength_model": 0.5}},
        "60": {"class_type": "KSampler", "inputs": {"model": ["16", 0], **sampler}},
        "61": {"class_type": "SaveLatent", "inputs": {"samples": ["60", 0], "filename_prefix": "extract/two_loras"}},
    }


def _latent(server, outputs, node_id) -> torch.Tensor:
    from safetensors.torch import load_file

    entry = outputs[node_id]["latents"][0]
    return load_file(str(server.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def test_library_extracts_the_fused_lora_from_the_files_at_its_rank(extraction_models):
    _, base, safe, deltas = extraction_models
    expert, report = extraction.extract_expert(extraction.weights_from_path(safe), extraction.weights_from_path(base),
                                               rank=RANK)
    assert set(expert.modules) == set(deltas) and expert.architecture == "sd15"
    errors = {m: float((expert.delta_weight(m) - d).norm() / d.norm()) for m, d in deltas.items()}
    assert max(errors.values()) <= 1e-3, errors
    # The base checkpoint has a CLIP and a VAE, the UNet file does not: reported, not silently ignored.
    assert report.only_in_one_model and not report.unrequested


def test_extract_node_output_on_another_finetune_matches_the_original_lora(extraction_models):
    server, _, _, deltas = extraction_models
    outputs = server.run_workflow(_graph(), timeout=400)
    report = outputs["10"]["text"][0]
    assert "as a LoRA at rank 4" in report and "no parameter outside the requested layers differs" in report
    saved = lora_files.load_expert(server.base_dir / "models" / "safety_experts" / "extracted" /
                                   "released_safety.safetensors")
    assert saved.categories == ["Sexual", "my own concept"] and saved.architecture == "sd15"
    assert saved.rank == RANK and set(saved.modules) == set(deltas)
    errors = {m: float((saved.delta_weight(m) - d).norm() / d.norm()) for m, d in deltas.items()}
    assert max(errors.values()) <= 1e-3, errors
    recorded = json.loads(saved.metadata[extraction.EXTRACTION_KEY])
    assert recorded["overall_relative_error"] <= 1e-3 and set(recorded["relative_error"]) == set(deltas)

    extracted, original, finetune = (_latent(server, outputs, n) for n in ("21", "31", "41"))
    effect = float((original - finetune).abs().max())
    assert effect > 1e-2, f"the LoRA barely changes the fine-tune's latents ({effect})"
    gap = float((extracted - original).abs().max())
    print(f"extraction in ComfyUI: worst module ΔW error {max(errors.values()):.2e}; latents max |extracted − "
          f"original LoRA| {gap:.2e}, LoRA effect max |original − fine-tune| {effect:.3g}")
    assert gap <= 1e-3 * effect, f"extracted expert and original LoRA differ by {gap} (LoRA effect {effect})"
    # Merged with the user's own expert at weight 0.5: the same as both LoRAs chained in core loaders.
    merged, two_loras = _latent(server, outputs, "51"), _latent(server, outputs, "61")
    own_effect = float((two_loras - original).abs().max())
    merged_gap = float((merged - two_loras).abs().max())
    print(f"extracted + own expert (w 0.5), linear merge vs two chained LoraLoaders: max |Δ| {merged_gap:.2e} "
          f"(own expert's effect {own_effect:.3g})")
    assert own_effect > 1e-2 and merged_gap <= 1e-3 * max(effect, own_effect)


def test_save_a_safe_checkpoint_bakes_the_expert_in_and_extracts_back(extraction_models):
    """The "Save a safe checkpoint" chain: Load Checkpoint → Load Safety Expert → Apply → ComfyUI's CheckpointSave."""
    server, base, _, deltas = extraction_models
    lora_files.save_expert(random_expert(attention_modules(base), "known", "sd15", 21, rank=RANK),
                           server.base_dir / "models" / "safety_experts" / "known_for_checkpoint.safetensors")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LIVE_CHECKPOINT}},
        "2": {"class_type": "SafetyDPOLoadExpert", "inputs": {
            "expert_name": "safety_experts/known_for_checkpoint.safetensors", "weight": 1.0}},
        "3": {"class_type": "SafetyDPOApplyExperts", "inputs": {"model": ["1", 0], "experts": ["2", 0],
                                                                "strength": 1.0, "clip": ["1", 1]}},
        "4": {"class_type": "CheckpointSave", "inputs": {"model": ["3", 0], "clip": ["3", 1], "vae": ["1", 2],
                                                         "filename_prefix": "checkpoints/safetydpo_safe_test"}},
    }
    server.run_workflow(graph, timeout=400)
    saved = sorted((server.base_dir / "output" / "checkpoints").glob("safetydpo_safe_test_*.safetensors"))
    assert len(saved) == 1
    expert, report = extraction.extract_expert(extraction.weights_from_path(saved[0]),
                                               extraction.weights_from_path(base), rank=RANK)
    errors = {m: float((expert.delta_weight(m) - d).norm() / d.norm()) for m, d in deltas.items()}
    print(f"saved safe checkpoint: worst module ΔW error {max(errors.values()):.2e}; "
          f"unrequested differences {report.unrequested_groups}")
    assert set(expert.modules) == set(deltas) and max(errors.values()) <= 1e-3, errors
    assert not report.unrequested, "Apply + CheckpointSave changed weights outside the expert"


# -- in process: patched MODELs, energy and exact modes, bad input ------------------------------

@pytest.fixture(scope="module")
def extract_node(nodes_in_process):  # noqa: F811
    from test_nodes_comfyui import load_nodes_module

    return load_nodes_module("nodes_extraction").ExtractSafetyExpert, nodes_in_process


def _extract(node, safe, base, **options):
    arguments = dict(layers="attention", output="lora", rank=RANK, energy=0.99, max_rank=128, categories="Violence",
                     name="x", weight=1.0, save_name="")
    arguments.update(options)
    return node.execute(safe, base, **arguments)


def test_extract_node_computes_patched_models_and_chains(extract_node, sd15_model, comfy_inprocess, sd15_checkpoint):  # noqa: F811
    node, (nodes, root) = extract_node
    model, _ = sd15_model
    known = random_expert(attention_modules(sd15_checkpoint), "known", "sd15", 31, rank=RANK)
    tensors, _ = lora_files.expert_to_state_dict(known)
    # A LoRA added by ComfyUI's own loader at strength 0.5: the MODEL carries patches, not new weights.
    patched, _ = comfy_inprocess.sd.load_lora_for_models(model, None, tensors, 0.5, 0.0)
    chain, text = _extract(node, patched, model, save_name="sub/from_patches", name="from_patches")
    expert = chain[0].expert
    for module, delta in known.delta_weights().items():
        assert float((expert.delta_weight(module) - 0.5 * delta).norm() / (0.5 * delta).norm()) <= 1e-3, module
    assert "saved to" in text and (root / "safety_experts" / "sub" / "from_patches.safetensors").is_file()
    assert lora_files.load_expert(
        root / "safety_experts" / "sub" / "from_patches.safetensors").categories == ["Violence"]
    # Chained after another expert, with its own weight; energy and exact modes.
    longer, _ = _extract(node, patched, model, rank=0, energy=0.999, weight=0.5, name="by_energy", experts=chain)
    assert [(c.expert.name, c.weight) for c in longer] == [("from_patches", 1.0), ("by_energy", 0.5)]
    assert max(m.rank for m in longer[1].expert.modules.values()) <= RANK
    exact, text = _extract(node, patched, model, output="exact diffs", name="exact")
    assert exact[0].expert.diffs and not exact[0].expert.modules and "exact weight differences" in text


def test_extract_node_refuses_bad_input(extract_node, sd15_model, comfy_inprocess, sdxl_checkpoint):  # noqa: F811
    node, (nodes, _) = extract_node
    model, _ = sd15_model
    with pytest.raises(ArchitectureMismatchError, match="no requested layer .* differs"):
        _extract(node, model, model)
    with pytest.raises(LoraFormatError, match="not a file name inside the model folders"):
        _extract(node, model, model, save_name="../outside")
    with pytest.raises(ArchitectureMismatchError, match="text-encoder differences need the command line"):
        _extract(node, model, model, layers="text_encoder")
    sdxl = comfy_inprocess.load_diffusion_model(sdxl_checkpoint)
    with pytest.raises(ArchitectureMismatchError, match="safe_model is sdxl but base_model is sd15"):
        _extract(node, sdxl, model)
