"""One place for files: what the pack writes is readable by group and others under umask 022 (a ComfyUI running
as another user can load it), an interrupted write keeps the old file and leaves no temp file, safetensors
are read with our errors, and files are hashed in one way."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from shared_helpers import load_script

from comfyui_safetydpo import calibration, files, lora_files
from comfyui_safetydpo.errors import LoraFormatError, MergeError, SafetyDPOError, TrainingError
from comfyui_safetydpo.expert import LoraModule, SafetyExpert
from comfyui_safetydpo.least_squares_merge import LayerInputStatistics

REPO_ROOT = Path(__file__).resolve().parents[1]
Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


def expert(name: str, seed: int = 0) -> SafetyExpert:
    generator = torch.Generator().manual_seed(seed)
    modules = {m: LoraModule(torch.randn(2, 8, generator=generator), torch.randn(8, 2, generator=generator), 2.0)
               for m in (Q, K)}
    return SafetyExpert(name, modules, architecture="sd15", categories=["Hate"])


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the test process is single-threaded here; restored below
    try:
        yield
    finally:
        os.umask(old)


def _unreadable(root: Path) -> list:
    """Paths under ``root`` (and ``root``) that group or others cannot read (or, for folders, enter)."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        need = 0o055 if path.is_dir() else 0o044
        if mode & need != need:
            bad.append(f"{path.relative_to(root.parent)} {oct(mode)}")
    return bad


def _load_cli(name: str):
    return load_script(f"trainer/{name}.py", f"safetydpo_files_{name}_cli")


# -- permissions --------------------------------------------------------------------------------

def test_current_umask_is_read_without_changing_it(umask_022):
    assert files.current_umask() == 0o022
    assert files.file_mode() == 0o644 and files.folder_mode() == 0o755
    os.umask(0o027)
    assert files.current_umask() == 0o027
    assert os.umask(0o027) == 0o027, "reading the umask changed it"


def test_current_umask_without_proc_uses_a_probe_file(umask_022, monkeypatch):
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert files.current_umask() == 0o022


def test_experts_and_merged_loras_are_readable_by_group_and_others(tmp_path, umask_022):
    hate, violence = expert("hate", 1), expert("violence", 2)
    first = lora_files.save_expert(hate, tmp_path / "experts" / "hate.safetensors")
    second = lora_files.save_expert(violence, tmp_path / "experts" / "violence.safetensors")
    lora_files.save_peft_folder(hate, tmp_path / "experts" / "hate_peft")
    # trainer/merge.py's output was -rw------- under umask 022 before files.atomic_write
    merged = tmp_path / "merged" / "merged.safetensors"
    assert _load_cli("merge").main([str(first), str(second), "--method", "linear", "--output", str(merged)]) == 0
    assert merged.is_file()
    assert _unreadable(tmp_path / "experts") == []
    assert _unreadable(tmp_path / "merged") == []


def test_statistics_are_readable_by_group_and_others(tmp_path, umask_022):
    experts = [expert("hate", 1), expert("violence", 2)]
    co_stats = {e.name: {m: calibration.ModuleStatistics(torch.rand(8), torch.rand(8), 4) for m in (Q, K)}
                for e in experts}
    calibration.CalibrationStatistics(co_stats, {e.name: calibration.expert_fingerprint(e) for e in experts}).save(
        tmp_path / "stats" / "co_merge.safetensors")
    ls_stats = LayerInputStatistics({m: torch.eye(8) for m in (Q, K)}, {m: 2 * torch.eye(8) for m in (Q, K)},
                                    {e.name: {m: torch.rand(2, 8) for m in (Q, K)} for e in experts},
                                    {e.name: calibration.expert_fingerprint(e) for e in experts})
    ls_stats.save(tmp_path / "stats" / "least_squares.safetensors")
    assert LayerInputStatistics.load(tmp_path / "stats" / "least_squares.safetensors").fingerprints == \
        ls_stats.fingerprints
    assert _unreadable(tmp_path / "stats") == []


def test_training_checkpoints_and_metrics_are_readable_by_group_and_others(tmp_path, umask_022):
    from training_helpers import tiny_bundle

    from comfyui_safetydpo.training import (TrainingConfig, inject_lora, latest_checkpoint, lora_parameters,
                                            save_checkpoint)

    bundle = tiny_bundle()
    inject_lora(bundle.unet, TrainingConfig(rank=2, max_steps=1, checkpoint_every=1))
    optimizer = torch.optim.AdamW(list(lora_parameters(bundle.unet).values()), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(folder, bundle.unet, optimizer, None, {"step": step, "epoch": 0, "position": 0}, generator)
    assert latest_checkpoint(folder).name == "step_0000002"
    assert (folder / "step_0000002" / "lora.safetensors").is_file()
    assert _unreadable(folder) == []


def test_evaluation_runs_reports_and_pairs_are_readable_by_group_and_others(tmp_path, umask_022):
    from test_evaluation import PROMPTS, RED, ColourWorld
    from training_helpers import colour_pairs

    from comfyui_safetydpo import evaluation, reports
    from comfyui_safetydpo.concepts import write_concept_csv
    from comfyui_safetydpo.pairs import load_pairs

    summary = evaluation.evaluate(tmp_path / "run", PROMPTS[:2], [1], {"base": ColourWorld(),
                                                                        "aligned": ColourWorld({"red": "blue"})}, RED)
    written = reports.write_report(summary, tmp_path / "report", blur_unsafe=False)
    assert written.figures and written.tables
    dataset = colour_pairs(tmp_path / "pairs", count=2)
    manifest = dataset.save()
    assert len(load_pairs(manifest.parent)) == 2
    write_concept_csv([], tmp_path / "concepts" / "concepts.csv")
    for folder in ("run", "report", "pairs", "concepts"):
        assert _unreadable(tmp_path / folder) == [], folder


# -- interrupted writes -------------------------------------------------------------------------

def _temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_an_exception_while_writing_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "notes.json"
    files.write_json(target, {"version": 1})

    def half_then_fail(temp: Path) -> None:
        temp.write_text('{"version": 2, "unfini')
        raise KeyboardInterrupt  # not a disk error: passes through unchanged

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"version": 1}
    assert _temporaries(tmp_path) == []


def test_a_disk_error_while_writing_is_our_error_naming_the_file(tmp_path):
    target = tmp_path / "expert.safetensors"
    lora_files.save_expert(expert("old"), target)
    before = target.read_bytes()

    def full_disk(temp: Path) -> None:
        temp.write_bytes(b"\0" * 64)
        raise OSError(28, "No space left on device")

    with pytest.raises(LoraFormatError, match=r"expert\.safetensors: could not write the expert .*free disk space"):
        files.atomic_write(target, full_disk, error=LoraFormatError, what="expert")
    assert target.read_bytes() == before
    assert _temporaries(tmp_path) == []


def test_real_writers_interrupted_keep_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    expert_file = lora_files.save_expert(expert("old"), tmp_path / "hate.safetensors")
    stats_file = tmp_path / "stats.safetensors"
    experts = [expert("old")]
    stats = calibration.CalibrationStatistics(
        {"old": {m: calibration.ModuleStatistics(torch.rand(8), torch.rand(8), 1) for m in (Q, K)}},
        {"old": calibration.expert_fingerprint(experts[0])})
    stats.save(stats_file)
    before = {p: p.read_bytes() for p in (expert_file, stats_file)}
    real = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:20])
        raise RuntimeError("interrupted")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(RuntimeError):
        lora_files.save_expert(expert("new", 3), expert_file)
    with pytest.raises(RuntimeError):
        stats.save(stats_file)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert {p: p.read_bytes() for p in before} == before
    assert _temporaries(tmp_path) == []
    assert lora_files.load_expert(expert_file).name == "old"


def test_an_interrupted_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "step_0000001"
    with files.atomic_folder(target) as temp:
        (temp / "state.json").write_text("1")
    with pytest.raises(ValueError):
        with files.atomic_folder(target) as temp:
            (temp / "state.json").write_text("2")
            raise ValueError("interrupted")
    assert (target / "state.json").read_text() == "1"
    assert _temporaries(tmp_path) == []
    with pytest.raises(TrainingError, match="step_0000001: could not write the checkpoint"):
        with files.atomic_folder(target, error=TrainingError, what="checkpoint") as temp:
            raise OSError(28, "No space left on device")
    assert (target / "state.json").read_text() == "1"
    assert _temporaries(tmp_path) == []


# -- reading and hashing ------------------------------------------------------------------------

@pytest.mark.parametrize("damage, needle", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: b"just some text, not tensors", "not a safetensors file"),
    (lambda data: len(b"{oops").to_bytes(8, "little") + b"{oops", "corrupt"),
    (lambda data: b"", "empty"),
    (lambda data: b"\x80\x04" + data, "pickle"),
])
def test_broken_safetensors_are_our_error_naming_the_file_and_what_to_do(tmp_path, damage, needle):
    path = lora_files.save_expert(expert("e"), tmp_path / "broken.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MergeError) as caught:
        files.read_safetensors(path, error=MergeError)
    message = str(caught.value)
    assert str(path) in message and needle in message
    assert any(hint in message for hint in ("again", "Convert it")), message
    with pytest.raises(LoraFormatError, match="broken.safetensors"):
        lora_files.load_expert(path)


def test_reading_back_what_was_written(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1)}
    path = files.save_safetensors(tmp_path / "t.safetensors", tensors, {"kind": "test"})
    read, metadata = files.read_safetensors(path)
    assert metadata == {"kind": "test"}
    assert all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert files.safetensors_keys(path) == ["a", "b"]
    with pytest.raises(SafetyDPOError, match="no such file"):
        files.read_safetensors(tmp_path / "missing.safetensors", error=SafetyDPOError)


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    path = files.write_bytes(tmp_path / "blob.bin", os.urandom(3 << 20))
    assert files.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert files.sha256_file(path, chunk_size=1000) == files.sha256_file(path)


def test_text_png_and_json_writers_produce_what_was_given(tmp_path):
    import numpy as np
    from PIL import Image

    text = "a,b\r\nc,d\nü\n"
    assert files.write_text(tmp_path / "t.csv", text).read_bytes() == text.encode("utf-8")
    data = {"name": "Gewalt ü", "n": [1, 2]}
    assert json.loads(files.write_json(tmp_path / "d.json", data).read_text(encoding="utf-8")) == data
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with Image.open(files.save_png(tmp_path / "i.png", image)) as png:
        assert png.format == "PNG" and np.array_equal(np.asarray(png.convert("RGB")), image)
    assert _temporaries(tmp_path) == []
