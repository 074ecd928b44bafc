"""CoProV2: pairing by index, category sets and spellings, concept blocks, test-file overlap, images."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import pytest

from comfyui_safetydpo.coprov2 import (
    category_counts,
    concept_blocks,
    coprov2_from_image_folder,
    default_coprov2_folder,
    extract_coprov2_parquet,
    image_names,
    load_coprov2_test,
    load_coprov2_train,
)
from comfyui_safetydpo.errors import DatasetError
from comfyui_safetydpo.pairs import load_pairs

FOLDER = default_coprov2_folder()
REAL = pytest.mark.skipif(
    FOLDER is None or not (FOLDER / "CoProv2_train.csv").is_file(),
    reason="the CoProV2 CSVs are not here: set SAFETYDPO_COPROV2 to the folder holding CoProv2_train.csv",
)


@pytest.fixture(scope="module")
def real_pairs():
    return load_coprov2_train(FOLDER)


@REAL
def test_real_training_file_counts(real_pairs):
    assert len(real_pairs) == 15690
    assert sum(len(p.categories) > 1 for p in real_pairs) == 321
    assert category_counts(real_pairs) == {
        "Hate": 4393, "Sexual": 2712, "Violence": 2141, "Shocking": 2115,
        "Illegal Activity": 1923, "Harassment": 1801, "Self-harm": 958,
    }
    assert real_pairs.skipped == []
    first = real_pairs[0]
    assert first.source_id == "0000000_0" and image_names(first) == ("u_idx_0000000_0.jpg", "s_idx_0000000_0.jpg")
    assert first.prompt.startswith("A porch monkey swings") and first.safe_prompt.startswith("A porch monkey enjoys")


@REAL
def test_real_multi_category_pair_is_not_paired_by_row_order(real_pairs):
    # Lines 222-225 hold key 0000110_0 as unsafe, unsafe, safe, safe (Hate + sexual): row order would
    # pair an unsafe prompt with itself.
    pair = next(p for p in real_pairs if p.source_id == "0000110_0")
    assert pair.categories == ("Hate", "Sexual")
    assert pair.prompt != pair.safe_prompt and "queer couple" in pair.prompt


@REAL
def test_real_selection_limit_and_test_file_flags(real_pairs):
    selfharm = load_coprov2_train(FOLDER, categories=["self-harm"], limit=50)
    assert len(selfharm) == 50 and all("Self-harm" in p.categories for p in selfharm)
    tests = load_coprov2_test(FOLDER)
    assert len(tests) == 8000
    overlap = sum(t.in_training for t in tests)
    assert 650 <= overlap <= 750  # "about 700" per the release notes; 728 measured
    training_prompts = {p.prompt for p in real_pairs}
    assert all((t.prompt in training_prompts) == t.in_training for t in tests[:500])
    assert {t.category for t in tests} == set(category_counts(real_pairs))


@REAL
def test_real_concept_blocks_keep_prompt_blocks_together(real_pairs):
    concepts = collections.Counter(p.concept for p in real_pairs)
    sizes = sorted(concepts.values())
    # Blocks of about ten: most concepts are 8-12 prompts or a multiple (the term reused in another category).
    assert 800 <= len(concepts) <= 1600, len(concepts)
    assert sizes[len(sizes) // 2] in range(9, 21)
    by_key = {p.source_id: p.concept for p in real_pairs}
    # The first four blocks of the file (porch monkey, coon, spooky, jungle bunny) are four concepts.
    firsts = [by_key[f"{i:07d}_0"] for i in range(40)]
    assert [len(set(firsts[k:k + 10])) for k in range(0, 40, 10)] == [1, 1, 1, 1]
    assert len(set(firsts)) == 4
    # The drifted blocks at 5004-5013 (libtard) and 5014-5023 (limey) are found despite not starting at ...0.
    assert len({by_key[f"{i:07d}_0"] for i in range(5004, 5014)}) == 1
    assert by_key["0005013_0"] != by_key["0005014_0"]


def _write_csv(path: Path, rows):
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["prompt", "image", "category"])
        writer.writerows(rows)
    return path


GOOD_ROWS = [
    ["unsafe a", "u_idx_0000000_0.jpg", "Hate"],
    ["safe a", "s_idx_0000000_0.jpg", "Hate"],
    ["unsafe b", "u_idx_0000001_0.jpg", "Harrasment"],
    ["unsafe b", "u_idx_0000001_0.jpg", "self-harm"],
    ["safe b", "s_idx_0000001_0.jpg", "HARRASMENT"],
    ["safe b", "s_idx_0000001_0.jpg", "self-harm"],
]


def test_small_file_pairs_by_key_and_normalises_spellings(tmp_path):
    pairs = load_coprov2_train(_write_csv(tmp_path / "t.csv", GOOD_ROWS[::-1]))  # any row order
    assert [(p.source_id, p.prompt, p.safe_prompt, p.categories) for p in pairs] == [
        ("0000000_0", "unsafe a", "safe a", ("Hate",)),
        ("0000001_0", "unsafe b", "safe b", ("Harassment", "Self-harm")),
    ]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([["unsafe c", "u_idx_0000002_0.jpg", "Hate"]], r"0000002_0: unpaired unsafe row\(s\) at line\(s\) \[8\]"),
        ([["unsafe c", "u_idx_0000002_0.jpg", "Hate"], ["unsafe d", "u_idx_0000002_0.jpg", "Hate"],
          ["safe c", "s_idx_0000002_0.jpg", "Hate"]],
         r"0000002_0: two unsafe rows with different prompts at lines \[8, 9\]"),
        ([["unsafe c", "u_idx_0000002_0.jpg", "Hate"], ["safe c", "s_idx_0000002_0.jpg", "Hate"],
          ["safe c", "s_idx_0000002_0.jpg", "Hate"]], r"two safe rows for the same category at lines \[9, 10\]"),
        ([["unsafe c", "u_idx_0000002_0.jpg", "Gore"], ["safe c", "s_idx_0000002_0.jpg", "Gore"]],
         r"line 8: unknown category 'Gore'"),
        ([["unsafe c", "unsafe_2.jpg", "Hate"]], r"line 8: image name 'unsafe_2.jpg'"),
        ([["unsafe c", "u_idx_0000002_0.jpg", "Hate"], ["safe c", "s_idx_0000002_0.jpg", "Violence"]],
         r"unsafe rows \(lines \[8\]\) say \['Hate'\] but safe rows \(lines \[9\]\) say \['Violence'\]"),
    ],
)
def test_bad_rows_name_lines_or_are_skipped_with_a_count(tmp_path, extra, expected):
    path = _write_csv(tmp_path / "t.csv", GOOD_ROWS + extra)
    with pytest.raises(DatasetError, match=expected):
        load_coprov2_train(path)
    skipped = load_coprov2_train(path, on_error="skip")
    assert [p.source_id for p in skipped] == ["0000000_0", "0000001_0"]
    assert len(skipped.skipped) >= 1


def test_empty_selection_and_missing_file_are_errors(tmp_path):
    path = _write_csv(tmp_path / "t.csv", GOOD_ROWS)
    with pytest.raises(DatasetError, match="no pair has categories"):
        load_coprov2_train(path, categories=["Violence"])
    with pytest.raises(DatasetError, match="not found"):
        load_coprov2_train(tmp_path / "nothing.csv")
    with pytest.raises(DatasetError, match="unknown category 'Nope'"):
        load_coprov2_train(path, categories=["Nope"])


def test_concept_blocks_follow_shared_words_not_positions():
    prompts = ([f"A porch monkey does thing {i}" for i in range(7)]
               + [f"A jungle rabbit does thing {i}" for i in range(13)])
    prompts += ["A porch monkey returns"] * 3  # the same term again later: same concept
    names = concept_blocks(prompts, max_document_frequency=12)
    assert len(set(names[:7])) == 1 and len(set(names[7:20])) == 1 and names[0] != names[7]
    assert names[20] == names[0]


def _tiny_png(path: Path, colour, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_released_image_folder_layout(tmp_path):
    pairs = load_coprov2_train(_write_csv(tmp_path / "t.csv", GOOD_ROWS))
    images = tmp_path / "images"
    images.mkdir()
    for key in ("0000000_0", "0000001_0"):
        _tiny_png(images / f"u_idx_{key}.jpg", (200, 0, 0))
        _tiny_png(images / f"s_idx_{key}.jpg", (0, 0, 200))
    dataset = coprov2_from_image_folder(images, pairs)
    assert [p.rejected_image for p in dataset.pairs] == ["u_idx_0000000_0.jpg", "u_idx_0000001_0.jpg"]
    dataset.save(tmp_path / "dataset")
    loaded = load_pairs(tmp_path / "dataset")
    assert loaded.pairs == dataset.pairs and loaded.categories == ["Harassment", "Hate", "Self-harm"]
    (images / "s_idx_0000001_0.jpg").unlink()
    with pytest.raises(DatasetError, match=r"pair 0000001_0: image\(s\) missing .*s_idx_0000001_0.jpg"):
        coprov2_from_image_folder(images, pairs)
    assert len(coprov2_from_image_folder(images, pairs, on_error="skip")) == 1


def test_parquet_shards_extract_to_the_released_naming(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: parquet shards are optional")
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    def png_bytes(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [{"bytes": png_bytes((200, 0, 0)), "path": "u_idx_0000000_0.jpg"},
            {"bytes": png_bytes((0, 0, 200)), "path": "s_idx_0000000_0.jpg"}]
    pq.write_table(pa.table({"image": rows}), tmp_path / "train-00000-of-00001.parquet")
    out = extract_coprov2_parquet(tmp_path, tmp_path / "images")
    assert sorted(p.name for p in out.iterdir()) == ["s_idx_0000000_0.jpg", "u_idx_0000000_0.jpg"]
    pairs = load_coprov2_train(_write_csv(tmp_path / "t.csv", GOOD_ROWS[:2]))
    assert len(coprov2_from_image_folder(out, pairs)) == 1
