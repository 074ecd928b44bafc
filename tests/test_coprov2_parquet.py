"""Released CoProV2 images as parquet shards in the published schema (``caption``, ``jpg_0`` = safe and
preferred, ``jpg_1`` = unsafe and rejected, ``label_0`` = 1): the shards written here become a pairs
dataset that the pair builder's command line writes and the trainer takes in place of a pairs folder.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from shared_helpers import load_script

from comfyui_safetydpo.coprov2 import UNMATCHED_CATEGORY, coprov2_from_parquet, load_coprov2_train
from comfyui_safetydpo.errors import DatasetError
from comfyui_safetydpo.pairs import load_pairs

from test_coprov2 import GOOD_ROWS, _write_csv
from test_training import load_train_cli

pa = pytest.importorskip("pyarrow", reason="pyarrow (the coprov2 extra) is not installed")
import pyarrow.parquet as pq  # noqa: E402


def jpeg(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path, rows):
    table = pa.table({"caption": [r[0] for r in rows], "jpg_0": [r[1] for r in rows],
                      "jpg_1": [r[2] for r in rows], "label_0": [r[3] for r in rows]})
    pq.write_table(table, path)
    return path


@pytest.fixture()
def shard(tmp_path):
    """Two CoProV2 prompts (Hate; Harassment + Self-harm), one caption not in the CSV, one tie."""
    rows = [("unsafe a", jpeg(1), jpeg(2), 1), ("unsafe b", jpeg(3), jpeg(4), 1),
            ("a prompt from elsewhere", jpeg(5), jpeg(6), 1), ("unsafe a", jpeg(7), jpeg(8), 0.5)]
    folder = tmp_path / "shards"
    folder.mkdir()
    return write_shard(folder / "train-00000-of-00001.parquet", rows), rows


def test_published_columns_become_pairs_with_csv_categories(tmp_path, shard):
    path, rows = shard
    prompts = load_coprov2_train(_write_csv(tmp_path / "t.csv", GOOD_ROWS))
    with pytest.raises(DatasetError, match=r"row 3: label_0 = 0.5 is a tie"):
        coprov2_from_parquet(path, tmp_path / "strict", prompt_pairs=prompts)
    dataset = coprov2_from_parquet(path, tmp_path / "dataset", prompt_pairs=prompts, on_error="skip")
    assert len(dataset) == 3 and dataset.info["unmatched"] == 1 and dataset.info["skipped"] == 1
    first = dataset.pairs[0]
    assert (first.prompt, first.safe_prompt, first.categories) == ("unsafe a", "safe a", ("Hate",))
    assert dataset.image_path(first.preferred_image).read_bytes() == rows[0][1]  # jpg_0: safe, preferred
    assert dataset.image_path(first.rejected_image).read_bytes() == rows[0][2]  # jpg_1: unsafe, rejected
    assert dataset.pairs[1].categories == ("Harassment", "Self-harm")
    assert dataset.pairs[2].categories == (UNMATCHED_CATEGORY,)
    loaded = load_pairs(tmp_path / "dataset")  # an ordinary dataset folder now
    assert loaded.pairs == dataset.pairs
    # label_0 = 0 means jpg_1 is the preferred image.
    flipped = write_shard(tmp_path / "flipped.parquet", [("unsafe a", jpeg(1), jpeg(2), 0)])
    pair = coprov2_from_parquet(flipped, tmp_path / "flipped", prompt_pairs=prompts).pairs[0]
    assert (tmp_path / "flipped" / pair.preferred_image).read_bytes() == jpeg(2)


def test_bad_shards_fail_clearly(tmp_path):
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "old.parquet")
    with pytest.raises(DatasetError, match=r"no column\(s\) \['caption', 'jpg_0', 'jpg_1'\]"):
        coprov2_from_parquet(tmp_path / "old.parquet", tmp_path / "out")
    write_shard(tmp_path / "broken.parquet", [("unsafe a", b"not an image", jpeg(2), 1)])
    with pytest.raises(DatasetError, match="not JPEG/PNG/WebP"):
        coprov2_from_parquet(tmp_path / "broken.parquet", tmp_path / "out2")
    (tmp_path / "damaged.parquet").write_bytes(b"PAR1 nothing")
    with pytest.raises(DatasetError, match="unreadable parquet"):
        coprov2_from_parquet(tmp_path / "damaged.parquet", tmp_path / "out3")


def test_pair_builder_and_trainer_take_the_shards(tmp_path, shard, monkeypatch, capsys):
    from training_helpers import save_tiny_diffusers_folder


    path, _ = shard
    _write_csv(tmp_path / "CoProv2_train.csv", GOOD_ROWS)
    monkeypatch.setenv("SAFETYDPO_COPROV2", str(tmp_path))
    builder = load_script("trainer/build_pairs.py", "safetydpo_build_pairs_cli")
    assert builder.main(["--coprov2-parquet", str(path.parent), "--output", str(tmp_path / "built"),
                         "--on-error", "skip", "--categories", "hate"]) == 0
    built = load_pairs(tmp_path / "built")
    assert [p.prompt for p in built.pairs] == ["unsafe a"] and built.categories == ["Hate"]

    # The trainer takes the shards' folder where it takes a pairs folder (categories from $SAFETYDPO_COPROV2).
    clean = path.parent.parent / "clean"
    clean.mkdir()
    write_shard(clean / "train-00000-of-00001.parquet", [("unsafe a", jpeg(1), jpeg(2), 1),
                                                          ("unsafe b", jpeg(3), jpeg(4), 1)])
    model = save_tiny_diffusers_folder("sd15", tmp_path / "model")
    cli = load_train_cli()
    assert cli.main(["--model", str(model), "--pairs", str(clean), "--output", str(tmp_path / "run"),
                     "--max-steps", "1", "--batch-size", "1", "--per-category", "--checkpoint-every", "0",
                     "--recipe", "safetydpo"]) == 0
    written = json.loads(capsys.readouterr().out)["experts"]
    assert set(written) == {"Hate", "Harassment", "Self-harm"}
    assert (clean / "manifest.json").is_file() and len(load_pairs(clean)) == 2
