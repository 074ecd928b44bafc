"""Catalogue of bad inputs: each one fails with one of our error types and a message that names the
file, key, module or row and says what to do (docs/hardening.md lists them as a table).

Library cases run everywhere; the few node cases (paths from the UI, strength) need ``COMFYUI_PATH``
and skip without it. Every case answers with our own error type naming the file, key or row.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared_helpers import random_expert

from comfyui_safetydpo import calibration, lora_files, merging, model_loading, pairs as pairs_module
from comfyui_safetydpo.errors import (ArchitectureMismatchError, DatasetError, LoraFormatError, MergeError,
                                      MissingWeightsError, SafetyDPOError, TrainingError)

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def make_expert(name="e", architecture="sd15", modules=(Q, K), out=8, inp=8, rank=2, seed=0, categories=("Hate",)):
    return random_expert(name, {m: (out, inp) for m in modules}, seed, rank, architecture=architecture,
                         categories=categories)


def kohya_state(rank=2, out=8, inp=8, alpha=True):
    state = {f"{KOHYA_Q}.lora_down.weight": torch.randn(rank, inp), f"{KOHYA_Q}.lora_up.weight": torch.randn(out, rank)}
    if alpha:
        state[f"{KOHYA_Q}.alpha"] = torch.tensor(float(rank))
    return state


def clear(excinfo, *needles):
    """The error is ours and its message contains every needle (file, key, what to do)."""
    assert isinstance(excinfo.value, SafetyDPOError), type(excinfo.value)
    message = str(excinfo.value)
    for needle in needles:
        assert str(needle) in message, f"{needle!r} missing from: {message}"
    return message


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    lora_files.save_expert(make_expert(), path)
    return path


# -- LoRA files -----------------------------------------------------------------------------------

def test_truncated_safetensors_names_the_file(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(good_file)
    clear(caught, "good.safetensors", "truncated")


def test_corrupt_header_names_the_file(good_file):
    data = bytearray(good_file.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header becomes garbage
    good_file.write_bytes(bytes(data))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(good_file)
    clear(caught, "good.safetensors", "corrupt")


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "empty.safetensors", "empty")


@pytest.mark.parametrize("protocol", [2, 4, "zip"])
def test_pickle_file_is_refused_without_unpickling(tmp_path, protocol):
    path = tmp_path / "model.safetensors"  # a pickle renamed: the content decides, not the suffix
    if protocol == "zip":
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:  # torch.save's zip layout
            archive.writestr("archive/data.pkl", pickle.dumps({"x": 1}))
    else:
        path.write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}, protocol=protocol))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "model.safetensors", "pickle", "Convert it to .safetensors")


def test_lora_for_another_architecture_is_refused_by_name():
    xl = make_expert("xl_expert", "sdxl")
    with pytest.raises(ArchitectureMismatchError) as caught:
        lora_files.check_compatible(xl, "sd15", source="xl.safetensors")
    clear(caught, "xl.safetensors", "xl_expert", "is for sdxl, but the model is sd15", "Use an expert trained")
    with pytest.raises(ArchitectureMismatchError) as caught:
        merging.merge_experts([make_expert("a"), make_expert("b", "sdxl")], method="linear")
    clear(caught, "a (sd15)", "b (sdxl)")


def test_rank_mismatch_inside_a_module_names_the_key(tmp_path):
    state = kohya_state()
    state[f"{KOHYA_Q}.lora_up.weight"] = torch.randn(8, 3)  # rank 3 vs down rank 2
    path = tmp_path / "rank.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "rank.safetensors", KOHYA_Q, "rank", "must agree")


def test_shape_mismatch_between_experts_names_module_and_experts():
    a, b = make_expert("a"), make_expert("b", inp=16)
    with pytest.raises(ArchitectureMismatchError) as caught:
        merging.merge_experts([a, b], method="linear")
    clear(caught, "attn1.to_", "(8, 16)", "'a'", "'b'", "different models")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_name_the_module(tmp_path, value):
    state = kohya_state()
    state[f"{KOHYA_Q}.lora_up.weight"][0, 0] = value
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "nan.safetensors", KOHYA_Q, "NaN/Inf", "up")


def test_non_finite_alpha_is_refused(tmp_path):
    state = kohya_state()
    state[f"{KOHYA_Q}.alpha"] = torch.tensor(float("inf"))
    path = tmp_path / "alpha.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "alpha.safetensors", "non-finite alpha")


def test_missing_alpha_means_scale_one_as_comfyui_does(tmp_path, caplog):
    """Documented behaviour, not an error: no alpha key → alpha = rank (ΔW = up @ down), with a warning."""
    state = kohya_state(rank=4, alpha=False)
    path = tmp_path / "noalpha.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.WARNING):
        expert = lora_files.load_expert(path)
    module = expert.modules[Q]
    assert module.alpha == 4.0 and module.scale == 1.0
    expected = state[f"{KOHYA_Q}.lora_up.weight"] @ state[f"{KOHYA_Q}.lora_down.weight"]
    assert torch.allclose(expert.delta_weight(Q), expected, atol=1e-6)
    assert any("no alpha" in r.getMessage() for r in caplog.records)


def test_mixed_dtypes_read_fine_as_float32(tmp_path):
    state = kohya_state(rank=2)
    state[f"{KOHYA_Q}.lora_down.weight"] = state[f"{KOHYA_Q}.lora_down.weight"].half()
    state[f"{KOHYA_Q}.lora_up.weight"] = state[f"{KOHYA_Q}.lora_up.weight"].bfloat16()
    state[f"{KOHYA_Q}.alpha"] = torch.tensor(2, dtype=torch.int64)
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    expert = lora_files.load_expert(path)
    module = expert.modules[Q]
    assert module.down.dtype == module.up.dtype == torch.float32 and module.alpha == 2.0
    assert torch.equal(module.up, state[f"{KOHYA_Q}.lora_up.weight"].float())


def test_unknown_keys_are_listed(tmp_path):
    state = kohya_state()
    state["model.something_else.weight"] = torch.zeros(2)
    path = tmp_path / "unknown.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "unknown.safetensors", "model.something_else.weight", "Supported: kohya")


def test_a_checkpoint_given_as_a_lora_is_refused(tmp_path):
    """A full model file (not a LoRA) picked by mistake: every key is reported as unreadable."""
    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "checkpoint.safetensors", "not LoRA keys")


def test_half_a_lora_pair_names_the_module(tmp_path):
    state = kohya_state()
    del state[f"{KOHYA_Q}.lora_up.weight"]
    path = tmp_path / "half.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "half.safetensors", KOHYA_Q, "only one of its up/down")


def test_unsupported_lora_variants_are_named(tmp_path):
    state = kohya_state()
    state[f"{KOHYA_Q}.dora_scale"] = torch.ones(1, 8)
    path = tmp_path / "dora.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "dora.safetensors", "dora_scale", "DoRA/LoCon/LoHa/LoKr")


def test_two_spellings_of_one_module_are_refused(tmp_path):
    state = kohya_state()
    peft = Q[len("unet."):]
    state[f"unet.{peft}.lora_A.weight"] = torch.randn(2, 8)
    state[f"unet.{peft}.lora_B.weight"] = torch.randn(8, 2)
    path = tmp_path / "twice.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "twice.safetensors", "appears twice", "mixes two spellings")


def test_broken_adapter_config_beside_a_peft_file_is_named(tmp_path):
    peft = Q[len("unet."):]
    save_file({f"unet.{peft}.lora_A.weight": torch.randn(2, 8), f"unet.{peft}.lora_B.weight": torch.randn(8, 2)},
              str(tmp_path / "peft.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(tmp_path / "peft.safetensors")
    clear(caught, "adapter_config.json", "not valid JSON")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(tmp_path / "peft.safetensors")
    clear(caught, "peft.safetensors", "rank 2", "r = 8", "belongs to another adapter")


def test_kohya_file_for_a_bigger_unet_names_the_key(tmp_path):
    """A module that does not exist in the architecture's UNet (block 7 of an SD1.5 UNet)."""
    name = "lora_unet_input_blocks_70_1_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "bigger.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8), f"{name}.lora_up.weight": torch.randn(8, 2)},
              str(path), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(LoraFormatError) as caught:
        lora_files.load_expert(path)
    clear(caught, "bigger.safetensors", name)


def test_rank_zero_lora_is_refused_at_load(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file({f"{KOHYA_Q}.lora_down.weight": torch.zeros(0, 8), f"{KOHYA_Q}.lora_up.weight": torch.zeros(8, 0),
               f"{KOHYA_Q}.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(LoraFormatError) as caught:
        expert = lora_files.load_expert(path)
        expert.delta_weights()
    clear(caught, "rank0.safetensors", KOHYA_Q)


# -- merging --------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights, needles", [
    ([1.0, -0.5], ["'b'", "-0.5", "≥ 0"]),
    ([0.0, 0.0], ["every expert has weight 0", "at least one weight > 0"]),
    ([1.0, float("nan")], ["'b'", "not a finite number"]),
    ([1.0], ["2 experts but 1 weights", "one weight per expert"]),
])
def test_bad_weights_are_refused_by_name(weights, needles):
    with pytest.raises(MergeError) as caught:
        merging.merge_experts([make_expert("a"), make_expert("b", seed=1)], weights, method="linear")
    clear(caught, *needles)


def test_zero_experts_is_refused():
    with pytest.raises(MergeError) as caught:
        merging.merge_experts([], method="linear")
    clear(caught, "no experts to merge", "at least one expert")


def test_duplicate_expert_names_are_refused():
    with pytest.raises(MergeError) as caught:
        merging.merge_experts([make_expert("same"), make_expert("same", seed=1)], method="linear")
    clear(caught, "distinct names", "same")


def test_unknown_method_and_option_are_refused():
    experts = [make_expert("a"), make_expert("b", seed=1)]
    with pytest.raises(MergeError) as caught:
        merging.merge_experts(experts, method="average")
    clear(caught, "'average'", "choose one of")
    with pytest.raises(MergeError) as caught:
        merging.merge_experts(experts, method="linear", density=0.3)
    clear(caught, "density", "linear")


def _statistics_for(experts):
    stats = {e.name: {m: calibration.ModuleStatistics(torch.ones(8), torch.ones(8), 4) for m in e.module_names}
             for e in experts}
    return calibration.CalibrationStatistics(stats, {e.name: calibration.expert_fingerprint(e) for e in experts})


def test_statistics_of_other_experts_are_refused():
    a, b = make_expert("a"), make_expert("b", seed=1)
    stats = _statistics_for([a, b])
    retrained_b = make_expert("b", seed=2)  # same name, other weights
    with pytest.raises(MergeError) as caught:
        merging.merge_experts([a, retrained_b], method="co_merge", statistics=stats)
    clear(caught, "'b'", "measured with other weights", "recompute the statistics")
    with pytest.raises(MergeError) as caught:
        merging.merge_experts([a, make_expert("c", seed=3)], method="co_merge", statistics=stats)
    clear(caught, "no entry for expert 'c'", "compute statistics for these experts")


def test_an_expert_file_given_as_statistics_is_refused(good_file):
    with pytest.raises(MergeError) as caught:
        calibration.CalibrationStatistics.load(good_file)
    clear(caught, "good.safetensors", "not a Co-Merge statistics file")


def test_damaged_statistics_file_names_the_file(tmp_path):
    a = make_expert("a")
    path = _statistics_for([a]).save(tmp_path / "stats.safetensors")
    tensors, metadata = lora_files.read_safetensors(path)
    metadata["experts"] = "[not json"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(MergeError) as caught:
        calibration.CalibrationStatistics.load(path)
    clear(caught, "stats.safetensors", "damaged", "recompute")


# -- full disk while saving -------------------------------------------------------------------------

def _mount_tiny_tmpfs(folder: Path, size: str = "96k") -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, timeout=20)
    return done.returncode == 0


FULL_DISK_RAW_ERROR = ("on a really full disk safetensors raises SafetensorError('... No space left on device (os "
                       "error 28)'), not OSError: lora_files.save_expert and CalibrationStatistics.save catch only "
                       "OSError, so the raw SafetensorError escapes instead of our error saying to free disk space "
                       "(the temp file is removed and the old file is intact)")


@pytest.fixture(params=["tmpfs", "oserror", "safetensors_error"])
def full_disk(request, tmp_path, monkeypatch):
    """A folder where the next big write fails for lack of space, as ``(folder, arm, variant)``.

    ``tmpfs``: a real 96 kB tmpfs (when ``mount`` works, as root); ``oserror`` / ``safetensors_error``:
    ``safetensors.torch.save_file`` writes half its bytes, then raises ``OSError(ENOSPC)`` or the
    ``SafetensorError`` that safetensors really raises on a full disk. ``arm()`` starts the failure.
    """
    folder = tmp_path / "disk"
    if request.param == "tmpfs":
        if not _mount_tiny_tmpfs(folder):
            pytest.skip("cannot mount a tmpfs here (not root or no mount permission); the patched variants run")
        try:
            yield folder, (lambda: None), request.param
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True, timeout=20)
        return
    folder.mkdir()
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def arm():
        def save_half_then_fail(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            if request.param == "oserror":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)

    yield folder, arm, request.param


def _left_behind(folder: Path, keep: set) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name not in keep)


def _save_expert_on_full_disk(full_disk):
    folder, arm, variant = full_disk
    target = folder / "expert.safetensors"
    lora_files.save_expert(make_expert("old", rank=1), target)
    before = target.read_bytes()
    arm()
    big = make_expert("new", out=320, inp=320, rank=64)  # ~ 330 kB: more than the tmpfs holds
    with pytest.raises(LoraFormatError) as caught:
        lora_files.save_expert(big, target)
    return folder, target, before, caught


def test_full_disk_while_saving_an_expert_keeps_the_old_file(full_disk):
    folder, target, before, _ = _save_expert_on_full_disk(full_disk)
    assert target.read_bytes() == before, "the old expert file was damaged"
    assert _left_behind(folder, {"expert.safetensors"}) == [], "a half-written temp file remains"
    assert lora_files.load_expert(target).name == "old"


def test_full_disk_while_saving_an_expert_says_free_disk_space(full_disk, request):
    *_, caught = _save_expert_on_full_disk(full_disk)
    clear(caught, "expert.safetensors", "free disk space")


def _save_statistics_on_full_disk(full_disk):
    folder, arm, variant = full_disk
    target = folder / "stats.safetensors"
    _statistics_for([make_expert("a")]).save(target)
    before = target.read_bytes()
    arm()
    big = make_expert("a", out=320, inp=320)
    stats = {"a": {m: calibration.ModuleStatistics(torch.ones(20000), torch.ones(20000), 1) for m in big.module_names}}
    with pytest.raises(MergeError) as caught:
        calibration.CalibrationStatistics(stats, {"a": "x"}).save(target)
    return folder, target, before, caught


def test_full_disk_while_saving_statistics_keeps_the_old_file(full_disk):
    folder, target, before, _ = _save_statistics_on_full_disk(full_disk)
    assert target.read_bytes() == before
    assert _left_behind(folder, {"stats.safetensors"}) == []


def test_full_disk_while_saving_statistics_says_so(full_disk, request):
    *_, caught = _save_statistics_on_full_disk(full_disk)
    clear(caught, "stats.safetensors", "could not write")


def _tiny_training_state(tmp_path):
    from training_helpers import tiny_bundle

    from comfyui_safetydpo.training import TrainingConfig, inject_lora

    bundle = tiny_bundle()
    config = TrainingConfig(rank=2, max_steps=1, checkpoint_every=1)
    inject_lora(bundle.unet, config)
    from comfyui_safetydpo.training import lora_parameters

    params = list(lora_parameters(bundle.unet).values())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    return bundle, optimizer


def _checkpoint_on_full_disk(full_disk):
    from comfyui_safetydpo.training import save_checkpoint

    folder, arm, _ = full_disk
    bundle, optimizer = _tiny_training_state(folder)
    generator = torch.Generator().manual_seed(0)
    checkpoints = folder / "checkpoints"
    try:
        save_checkpoint(checkpoints, bundle.unet, optimizer, None, {"step": 1, "epoch": 0, "position": 0},
                        generator)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"even the first small checkpoint does not fit this tmpfs ({error})")
    arm()
    for p in optimizer.param_groups[0]["params"]:  # optimizer state makes the second checkpoint bigger
        optimizer.state[p] = {"exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros(p.shape), "step": 1}
    big = {"step": 2, "epoch": 0, "position": 0, "history": [{"loss": 0.0}] * 5000}
    with pytest.raises(TrainingError) as caught:
        save_checkpoint(checkpoints, bundle.unet, optimizer, None, big, generator)
    return checkpoints, caught


def test_full_disk_while_saving_a_training_checkpoint_keeps_the_last_one(full_disk):
    from comfyui_safetydpo.training import latest_checkpoint

    checkpoints, _ = _checkpoint_on_full_disk(full_disk)
    assert latest_checkpoint(checkpoints).name == "step_0000001"
    assert (checkpoints / "latest").read_text().strip() == "step_0000001"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")], "a half-written temp folder remains"


def test_full_disk_while_saving_a_training_checkpoint_says_so(full_disk):
    _, caught = _checkpoint_on_full_disk(full_disk)
    clear(caught, "checkpoint", "disk space")


# -- data -----------------------------------------------------------------------------------------

def test_unknown_category_names_the_row():
    with pytest.raises(DatasetError) as caught:
        pairs_module.normalise_category("Gore", where="concepts.csv line 3")
    clear(caught, "concepts.csv line 3", "'Gore'", "use one of", "declare your own")


def test_concept_rows_without_a_safe_prompt_name_the_line(tmp_path):
    from comfyui_safetydpo.concepts import load_concept_file

    path = tmp_path / "concepts.csv"
    path.write_text("unsafe_prompt,safe_prompt,category\na bloody fight,two people talking,Violence\n"
                    "a hateful sign,,Hate\n")
    with pytest.raises(DatasetError) as caught:
        load_concept_file(path)
    clear(caught, "concepts.csv", "non-empty")


def test_empty_concept_file_is_refused(tmp_path):
    from comfyui_safetydpo.concepts import load_concept_file

    path = tmp_path / "empty.csv"
    path.write_text("unsafe_prompt,safe_prompt,category\n")
    with pytest.raises(DatasetError) as caught:
        load_concept_file(path)
    clear(caught, "empty.csv", "no prompt pairs")


def _dataset(tmp_path, count=3, sizes=None):
    from training_helpers import colour_pairs

    dataset = colour_pairs(tmp_path / "pairs", count)
    dataset.save(tmp_path / "pairs")
    return dataset


def test_missing_images_are_listed(tmp_path):
    dataset = _dataset(tmp_path)
    (tmp_path / "pairs" / dataset.pairs[1].rejected_image).unlink()
    with pytest.raises(DatasetError) as caught:
        pairs_module.load_pairs(tmp_path / "pairs")
    clear(caught, "u_1.png", "on_error='skip'")


def test_mixed_image_sizes_are_listed(tmp_path):
    dataset = _dataset(tmp_path)
    pairs_module.save_image_tensor(torch.zeros(3, 16, 16), tmp_path / "pairs" / dataset.pairs[2].preferred_image)
    with pytest.raises(DatasetError) as caught:
        pairs_module.load_pairs(tmp_path / "pairs")
    clear(caught, "s_2.png")


def test_unreadable_image_is_named(tmp_path):
    dataset = _dataset(tmp_path)
    (tmp_path / "pairs" / dataset.pairs[0].preferred_image).write_bytes(b"not a png")
    with pytest.raises(DatasetError) as caught:
        pairs_module.load_pairs(tmp_path / "pairs")
    clear(caught, "s_0.png")


def test_corrupt_manifest_is_named(tmp_path):
    _dataset(tmp_path)
    (tmp_path / "pairs" / "manifest.json").write_text('{"format": "safetydpo')
    with pytest.raises(DatasetError) as caught:
        pairs_module.load_pairs(tmp_path / "pairs")
    clear(caught, "manifest.json", "unreadable manifest", "rebuild")


def test_empty_selection_is_refused(tmp_path):
    _dataset(tmp_path)
    with pytest.raises(DatasetError) as caught:
        pairs_module.load_pairs(tmp_path / "pairs", categories=["Sexual"])
    clear(caught, "no usable preference pairs", "Sexual", "categories present")


def test_bad_on_error_choice_is_our_error(tmp_path):
    _dataset(tmp_path)
    with pytest.raises(DatasetError):
        pairs_module.load_pairs(tmp_path / "pairs", on_error="ignore")


# -- training ------------------------------------------------------------------------------------

def test_no_pairs_to_train_on(tmp_path):
    from training_helpers import tiny_bundle

    from comfyui_safetydpo.pairs import PreferencePairs
    from comfyui_safetydpo.training import TrainingConfig, train_expert

    with pytest.raises(DatasetError) as caught:
        train_expert(tiny_bundle(), PreferencePairs(root=tmp_path, pairs=[]), TrainingConfig(max_steps=1))
    clear(caught, "no pairs")


def test_invalid_training_settings_are_listed():
    from comfyui_safetydpo.training import TrainingConfig

    with pytest.raises(TrainingError) as caught:
        TrainingConfig(rank=0, learning_rate=-1, mixed_precision="fp8").validate()
    clear(caught, "rank must be ≥ 1", "learning_rate must be > 0", "mixed_precision must be")


def _short_run(tmp_path, **overrides):
    from training_helpers import colour_pairs, tiny_bundle

    from comfyui_safetydpo.training import TrainingConfig, train_expert

    settings = dict(max_steps=2, batch_size=2, checkpoint_every=1, learning_rate=1e-3)
    settings.update(overrides)
    pairs = colour_pairs(tmp_path / "pairs", 3)
    return lambda resume=False, **more: train_expert(tiny_bundle(), pairs, TrainingConfig(**{**settings, **more}),
                                                     output_dir=tmp_path / "run", resume=resume)


def test_corrupt_checkpoint_on_resume_names_the_file(tmp_path):
    run = _short_run(tmp_path)
    run()
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    data = (latest / "lora.safetensors").read_bytes()
    (latest / "lora.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(SafetyDPOError) as caught:
        run(resume=True, max_steps=4)
    clear(caught, "lora.safetensors", latest.name)


def test_damaged_checkpoint_state_on_resume_names_the_file(tmp_path):
    run = _short_run(tmp_path)
    run()
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    (latest / "state.json").write_text('{"step": 2, "epo')
    with pytest.raises(SafetyDPOError) as caught:
        run(resume=True, max_steps=4)
    clear(caught, "state.json")


def test_resume_with_other_targets_is_refused(tmp_path):
    run = _short_run(tmp_path)
    run()
    with pytest.raises(TrainingError) as caught:
        run(resume=True, max_steps=4, target_modules=("to_q",))
    clear(caught, "does not match this run's settings", "start a new output folder")


def test_resume_with_another_rank_is_refused(tmp_path):
    run = _short_run(tmp_path)
    run()
    with pytest.raises(TrainingError) as caught:
        run(resume=True, max_steps=4, rank=8)
    clear(caught, "does not match this run's settings", "start a new output folder")


def test_corrupt_encoding_cache_is_rebuilt_not_trusted(tmp_path):
    from training_helpers import colour_pairs, tiny_bundle

    from comfyui_safetydpo.encoding_cache import encode_preference_pairs

    bundle, pairs = tiny_bundle(), colour_pairs(tmp_path / "pairs", 3)
    first = encode_preference_pairs(bundle, pairs, tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("encoded_*.safetensors")
    cache.write_bytes(cache.read_bytes()[:100])
    again = encode_preference_pairs(bundle, pairs, tmp_path / "cache")
    assert torch.equal(first.winner_latents, again.winner_latents)
    assert lora_files.read_safetensors(cache)[0]  # rewritten whole


def test_corrupt_demo_cache_is_rebuilt_not_trusted(tmp_path):
    from comfyui_safetydpo import demo_world

    world = demo_world.DemoWorld(2)
    settings = demo_world.WorldModelSettings(steps=2, batch_size=4, width=16)
    first, info = demo_world.load_or_train_world_model(world, settings, tmp_path)
    assert info["cached"] is False
    (weights,) = tmp_path.glob("world_model_*/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # damage tensor bytes (the header still parses)
    weights.write_bytes(bytes(data))
    rebuilt, info = demo_world.load_or_train_world_model(world, settings, tmp_path)
    assert info["cached"] is False, "a damaged cache entry was trusted"
    for (name, a), (_, b) in zip(first.unet.state_dict().items(), rebuilt.unet.state_dict().items()):
        assert torch.equal(a, b), name
    _, info = demo_world.load_or_train_world_model(world, settings, tmp_path)
    assert info["cached"] is True


# -- model loading (trainer command line) ---------------------------------------------------------

def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(MissingWeightsError) as caught:
        model_loading.load_bundle(tmp_path / "nothing.safetensors")
    clear(caught, "nothing.safetensors", "no such model")


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(ArchitectureMismatchError) as caught:
        model_loading.load_bundle(path)
    clear(caught, "model.ckpt", "pickle", "convert it to .safetensors")


def test_checkpoint_of_an_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ArchitectureMismatchError) as caught:
        model_loading.load_bundle(path)
    clear(caught, "SD3/Flux", "Only UNet-based")


def test_unet_only_checkpoint_is_refused_for_training(tmp_path):
    path = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(ArchitectureMismatchError) as caught:
        model_loading.load_bundle(path)
    clear(caught, "no recognised text encoder", "use a full checkpoint or a diffusers folder")


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetyDPOError) as caught:
        model_loading.load_bundle(path)
    clear(caught, "broken.safetensors")


def test_folder_that_is_not_a_diffusers_model_is_named(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(MissingWeightsError) as caught:
        model_loading.load_bundle(tmp_path / "folder")
    clear(caught, "folder", "model_index.json")


# -- nodes (need ComfyUI in-process) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes(comfy_inprocess, tmp_path_factory):
    """The pack's nodes and bridge imported as ComfyUI does, model/input/output folders in a temp dir."""
    import comfyui_harness as harness
    import folder_paths

    root = tmp_path_factory.mktemp("bad_input_nodes")
    saved = ({k: folder_paths.folder_names_and_paths.get(k) for k in ("loras", "safety_experts")},
             folder_paths.get_input_directory(), folder_paths.get_output_directory())
    modules = {label: harness.plugin_module(comfy_inprocess.root, name)
               for label, name in (("experts", "nodes"), ("bridge", "comfyui_bridge"))}
    for name in ("loras", "safety_experts", "input", "output"):
        (root / name).mkdir()
    for name in ("loras", "safety_experts"):
        folder_paths.folder_names_and_paths[name] = ([str(root / name)], {".safetensors"})
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.filename_list_cache.clear()
    try:
        yield modules, root
    finally:
        for name, value in saved[0].items():
            if value is None:
                folder_paths.folder_names_and_paths.pop(name, None)
            else:
                folder_paths.folder_names_and_paths[name] = value
        folder_paths.set_input_directory(saved[1])
        folder_paths.set_output_directory(saved[2])
        folder_paths.filename_list_cache.clear()


@pytest.mark.parametrize("prefix", ["../../escaped", "/tmp/escaped", "sub/../../escaped", "C:/escaped"])
def test_save_node_never_writes_outside_loras(nodes, prefix):
    modules, root = nodes
    choice = modules["experts"].ExpertChoice(make_expert("saved"), 1.0, "x.safetensors")
    with pytest.raises(LoraFormatError) as caught:
        modules["experts"].SaveSafetyLora.execute((choice,), prefix)
    clear(caught, "filename_prefix", "inside the model folders")
    assert not list(root.parent.rglob("escaped*"))


@pytest.mark.parametrize("folder", ["../..", "/etc", "input/../../x"])
def test_train_node_pairs_folder_never_leaves_input_or_output(nodes, folder):
    modules, _ = nodes
    with pytest.raises(DatasetError) as caught:
        modules["bridge"].pairs_folder(folder)
    clear(caught, "pairs_folder", "leaves ComfyUI's input/output folders")


def test_expert_file_that_is_a_pickle_is_named_in_the_node(nodes):
    modules, root = nodes
    (root / "loras" / "old.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LoraFormatError) as caught:
        modules["experts"].LoadSafetyExpert.execute("loras/old.safetensors", 1.0)
    clear(caught, "old.safetensors", "pickle")


def test_negative_weight_in_the_load_node_is_refused(nodes):
    modules, root = nodes
    lora_files.save_expert(make_expert("w"), root / "safety_experts" / "w.safetensors")
    with pytest.raises(MergeError) as caught:
        modules["experts"].LoadSafetyExpert.execute("safety_experts/w.safetensors", -1.0)
    clear(caught, "w.safetensors", "must be ≥ 0")


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_non_finite_strength_is_refused(nodes, comfy_inprocess, sd15_checkpoint, strength):
    modules, _ = nodes
    from test_nodes_comfyui import attention_modules, random_expert

    model, clip, _ = comfy_inprocess.load_checkpoint(sd15_checkpoint)
    expert = random_expert(attention_modules(sd15_checkpoint), "s", "sd15", 1)
    with pytest.raises(SafetyDPOError) as caught:
        modules["bridge"].apply_experts(model, clip, (modules["experts"].ExpertChoice(expert, 1.0, "s"),), strength)
    clear(caught, "strength")
