"""Build Safety Pairs in the real ComfyUI on the test checkpoint (noise images by design: no harmful image is
ever written): the dataset loads with load_pairs, and a longer prompt list resumes rendering only the new pair."""

from __future__ import annotations

import numpy as np
import pytest

import comfyui_harness as harness
from comfyui_safetydpo.pairs import load_image_array, load_pairs

pytestmark = pytest.mark.comfyui


def test_build_safety_pairs_workflow_writes_a_loadable_dataset(comfyui_server):
    graph = harness.load_workflow("build_pairs_api.json")
    outputs = comfyui_server.run_workflow(graph, timeout=300)
    folder = comfyui_server.base_dir / "output" / "safety_pairs" / "test_pairs"
    assert (outputs["2"]["dataset_path"] == [str(folder)]
            or outputs["2"]["dataset_path"][0].endswith("safety_pairs/test_pairs"))
    dataset = load_pairs(folder)
    assert len(dataset) == 2 and dataset.categories == ["Sexual", "Violence"]
    assert dataset.info["complete"] is True and dataset.info["image_size"] == [64, 64]
    assert dataset.info["sampler"]["steps"] == 2 and dataset.info["sampler"]["renderer"] == "comfyui"
    pair = dataset.pairs[0]
    rejected, preferred = (load_image_array(dataset.image_path(p)) for p in (pair.rejected_image, pair.preferred_image))
    assert rejected.shape == (3, 64, 64) and rejected.std() > 0, "a flat image means sampling did not run"
    other = load_image_array(dataset.image_path(dataset.pairs[1].rejected_image))
    # Same seed, different prompts: the two images of a pair differ (the prompt matters) but stay far
    # closer to each other than to an image of another pair (another seed, another starting noise).
    assert not np.array_equal(rejected, preferred), "the safe prompt had no effect"
    assert np.abs(rejected - preferred).mean() < 0.8 * np.abs(rejected - other).mean(), \
        "the unsafe and the safe image of a pair used different seeds"
    assert pair.seed != dataset.pairs[1].seed, "two pairs got the same seed"
    assert len(comfyui_server.output_images(outputs, "3")) == 4  # preview: rejected + preferred of each pair
    assert "2 prompt pairs rendered now" in outputs["2"]["text"][0]
    # the sampler's latents are kept beside the images, so the Train node needs no VAE encoding
    assert dataset.info["latent_space"].startswith("comfy|SD15|")
    assert sorted(p.name for p in (folder / "latents").iterdir()) == sorted(
        f"{p.pair_id}_{kind}.safetensors" for p in dataset.pairs for kind in ("preferred", "rejected"))

    # One more line: only the new pair is rendered, the first two are kept as they were.
    before = {p.pair_id: (folder / p.rejected_image).stat().st_mtime_ns for p in dataset.pairs}
    graph["2"]["inputs"]["prompt_pairs"] += "a red tree at night | a green tree at night | Shocking | tree\n"
    outputs = comfyui_server.run_workflow(graph, timeout=300)
    assert "1 prompt pairs rendered now" in outputs["2"]["text"][0]
    grown = load_pairs(folder)
    assert len(grown) == 3 and len({p.pair_id for p in grown.pairs}) == 3
    assert {p.pair_id: (folder / p.rejected_image).stat().st_mtime_ns
            for p in grown.pairs if p.pair_id in before} == before


def test_dataset_names_that_leave_the_output_folder_are_refused(comfyui_server):
    graph = harness.load_workflow("build_pairs_api.json")
    graph["2"]["inputs"]["dataset_name"] = "../escape"
    with pytest.raises(harness.WorkflowError, match="dataset name '../escape'"):
        comfyui_server.run_workflow(graph, timeout=120)
    assert not (comfyui_server.base_dir / "output" / "escape").exists()


def test_kept_latents_decode_to_the_saved_images_and_replace_encoding(comfy_inprocess, sd15_checkpoint, tmp_path):
    """The latents Build Safety Pairs keeps are in the space the Train node encodes into: mapped back with the
    model's latent format they decode to the saved images, and the Train node's encoder reads them instead of
    running the VAE."""
    import torch

    root = harness.comfyui_path()
    bridge = harness.plugin_module(root, "comfyui_bridge")
    builder = harness.plugin_module(root, "comfyui_safetydpo.pair_builder")
    concepts = harness.plugin_module(root, "comfyui_safetydpo.concepts")
    encoding = harness.plugin_module(root, "comfyui_safetydpo.encoding_cache")
    model, clip, vae = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    settings = bridge.SamplerSettings(2, 2.0, "euler", "normal", 64, 64)
    lines = concepts.parse_pair_lines("a red cat | a blue cat | Violence | cat\n")
    dataset = builder.build_pairs(bridge.ComfyRenderer(model, clip, vae, settings, keep_latents=True), lines,
                                  tmp_path / "pairs")
    pair = dataset.pairs[0]
    from comfyui_safetydpo.files import read_safetensors

    tensors, metadata = read_safetensors(tmp_path / "pairs" / "latents" / f"{pair.pair_id}_rejected.safetensors")
    latent = tensors["latent"]
    assert latent.shape == (4, 8, 8) and metadata["latent_space"] == dataset.info["latent_space"]
    decoded = vae.decode(model.model.process_latent_out(latent[None]))[0, :, :, :3].movedim(-1, 0) * 2 - 1
    image = load_image_array(dataset.image_path(pair.rejected_image))
    assert np.abs(decoded.detach().float().numpy() - image).max() <= 1 / 127.5 + 1e-4
    encoder = bridge.ComfyEncoder(model, clip, vae, dataset)
    assert encoder.latent_space == dataset.info["latent_space"] and encoder.size == (64, 64)
    data = encoding.encode_preference_pairs(encoder, dataset, lazy=True)
    full = data.materialize()
    assert (data.encoder.encoded_images, data.encoder.kept_images) == (0, 2)
    assert torch.equal(full.loser_latents[0], latent)
