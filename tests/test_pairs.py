"""Preference-pair datasets: manifest round trip, every bad input as a DatasetError naming it (or a counted
skip), concept splits that never share a concept, per-category views, image loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from comfyui_safetydpo.errors import DatasetError
from comfyui_safetydpo.pairs import (
    PreferencePair,
    PreferencePairs,
    ReplayItem,
    load_image_array,
    load_image_tensor,
    load_pairs,
    normalise_category,
    split_by_concept,
)


def _image(path, colour, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_dataset(root, specs):
    """specs: (pair_id, categories, concept); images written as red (rejected) / blue (preferred)."""
    pairs = []
    for pair_id, categories, concept in specs:
        _image(root / "images" / f"{pair_id}_r.png", (255, 0, 0))
        _image(root / "images" / f"{pair_id}_p.png", (0, 0, 255))
        pairs.append(PreferencePair(pair_id, f"unsafe {pair_id}", f"safe {pair_id}", tuple(categories),
                                    f"images/{pair_id}_p.png", f"images/{pair_id}_r.png", seed=len(pairs),
                                    concept=concept))
    _image(root / "images" / "replay.png", (0, 255, 0))
    dataset = PreferencePairs(root=root, pairs=pairs, replay=[ReplayItem("r0", "a garden", "images/replay.png", 7)],
                              info={"model": {"name": "tiny"}, "sampler": {"steps": 4, "cfg": 5.0}})
    dataset.save()
    return dataset


SPECS = [("a", ["Violence"], "knife"), ("b", ["Violence", "Hate"], "knife"), ("c", ["Hate"], "slur"),
         ("d", ["Sexual"], "nude")]


def test_manifest_round_trip_and_per_category_views(tmp_path):
    saved = make_dataset(tmp_path / "ds", SPECS)
    loaded = load_pairs(tmp_path / "ds")
    assert loaded.pairs == saved.pairs and loaded.replay == saved.replay
    assert loaded.info["model"] == {"name": "tiny"} and loaded.info["sampler"] == {"steps": 4, "cfg": 5.0}
    assert loaded.info["skipped"] == 0
    views = loaded.by_category()
    assert {c: [p.pair_id for p in v.pairs] for c, v in views.items()} == {
        "Hate": ["b", "c"], "Sexual": ["d"], "Violence": ["a", "b"]}
    assert all(v.replay == loaded.replay for v in views.values())
    assert [p.pair_id for p in load_pairs(tmp_path / "ds", categories=["violence"]).pairs] == ["a", "b"]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["pairs"][1]["categories"] == ["Violence", "Hate"]
    # Saving elsewhere copies the images: the copy loads on its own.
    loaded.select(["Sexual"]).save(tmp_path / "copy")
    copy = load_pairs(tmp_path / "copy")
    assert [p.pair_id for p in copy.pairs] == ["d"] and copy.image_path("images/d_p.png").is_file()


def test_spellings_are_normalised_and_unknown_names_refused():
    assert [normalise_category(n) for n in ("sexual", "Harrasment", "self-harm", "ILLEGAL_ACTIVITY", "Self harm")] == [
        "Sexual", "Harassment", "Self-harm", "Illegal Activity", "Self-harm"]
    assert normalise_category("gore", extra_categories=["Gore"]) == "Gore"
    with pytest.raises(DatasetError, match="unknown category 'Gore'"):
        normalise_category("Gore")


def _edit_manifest(root, change):
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: _edit_manifest(root, lambda d: d["pairs"][2].update(categories=["Gore"])),
         r"pair #2 \('c'\).*unknown category 'Gore'"),
        (lambda root: (root / "images" / "c_r.png").unlink(), r"pair 'c': image missing: .*c_r.png"),
        (lambda root: (root / "images" / "c_p.png").write_bytes(b"broken"), r"pair 'c': .*c_p.png: unreadable image"),
        (lambda root: _image(root / "images" / "c_p.png", (0, 0, 255), size=(16, 16)),
         r"image of another size 16x16 .*c_p.png"),
        (lambda root: _edit_manifest(root, lambda d: d["pairs"][2].update(pair_id="a")),
         r"pair #2 \('a'\): duplicate pair_id"),
        (lambda root: _edit_manifest(root, lambda d: d["pairs"][2].update(preferred_image="images/c_r.png")),
         r"pair #2 \('c'\): preferred and rejected image are the same file"),
        (lambda root: _edit_manifest(root, lambda d: d["pairs"][2].pop("safe_prompt")),
         r"pair #2 \('c'\): missing field\(s\) \['safe_prompt'\]"),
    ],
)
def test_bad_datasets_name_the_pair_or_file_or_skip_with_a_count(tmp_path, damage, message):
    root = tmp_path / "ds"
    make_dataset(root, SPECS)
    damage(root)
    with pytest.raises(DatasetError, match=message):
        load_pairs(root)
    skipped = load_pairs(root, on_error="skip")
    assert [p.pair_id for p in skipped.pairs] == ["a", "b", "d"]
    assert skipped.info["skipped"] == 1 and skipped.info["skipped_reasons"]


def test_empty_selection_missing_manifest_and_all_bad_are_errors(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, SPECS)
    with pytest.raises(DatasetError, match=r"no usable preference pairs .*categories \['Self-harm'\]"):
        load_pairs(root, categories=["self-harm"])
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_pairs(tmp_path)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        load_pairs(root)
    make_dataset(root, SPECS[:1])
    (root / "images" / "a_r.png").unlink()
    with pytest.raises(DatasetError, match="no usable preference pairs"):
        load_pairs(root, on_error="skip")


def test_image_helpers_give_minus_one_to_one(tmp_path):
    _image(tmp_path / "x.png", (255, 0, 128))
    array = load_image_array(tmp_path / "x.png")
    assert array.shape == (3, 8, 8) and array.dtype == np.float32
    assert np.allclose(array[:, 0, 0], [1.0, -1.0, 128 / 127.5 - 1], atol=1e-6)
    tensor = load_image_tensor(tmp_path / "x.png")
    assert tuple(tensor.shape) == (3, 8, 8) and float(tensor[0].min()) == 1.0
    (tmp_path / "y.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="y.png: unreadable image"):
        load_image_array(tmp_path / "y.png")


def _in_memory(specs):
    return PreferencePairs(root=".", pairs=[
        PreferencePair(i, prompt, "safe", tuple(cats), "p", "r", concept=concept)
        for i, (prompt, cats, concept) in enumerate(specs)])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3", "p4", "p5"]),
                       st.lists(st.sampled_from(["Hate", "Sexual", "Violence"]), min_size=1, max_size=2, unique=True),
                       st.sampled_from(["", "knife", "gun", "slur", "nude", "blood"])), min_size=2, max_size=40),
    st.floats(0.05, 0.6), st.integers(0, 1000),
)
def test_split_never_shares_a_concept(specs, fraction, seed):
    dataset = _in_memory(specs)
    concepts = {p.concept_id for p in dataset.pairs}
    if len(concepts) < 2:
        with pytest.raises(DatasetError, match="cannot split"):
            split_by_concept(dataset, fraction, seed)
        return
    train, validation = split_by_concept(dataset, fraction, seed)
    assert train.pairs and validation.pairs
    assert not ({p.concept_id for p in train.pairs} & {p.concept_id for p in validation.pairs})
    assert sorted(p.pair_id for p in train.pairs + validation.pairs) == sorted(p.pair_id for p in dataset.pairs)
    assert split_by_concept(dataset, fraction, seed)[1].pairs == validation.pairs  # deterministic


def test_split_of_coprov2_by_detected_concepts_is_near_the_fraction():
    from comfyui_safetydpo.coprov2 import default_coprov2_folder, load_coprov2_train

    folder = default_coprov2_folder()
    if folder is None or not (folder / "CoProv2_train.csv").is_file():
        pytest.skip("the CoProV2 CSVs are not here: set SAFETYDPO_COPROV2")
    prompts = load_coprov2_train(folder)
    dataset = PreferencePairs(root=".", pairs=[PreferencePair(p.source_id, p.prompt, p.safe_prompt, p.categories,
                                                              "p", "r", concept=p.concept) for p in prompts])
    train, validation = split_by_concept(dataset, 0.1, seed=0)
    share = {c: len(validation.select([c])) / len(dataset.select([c])) for c in dataset.categories}
    assert all(0.05 <= s <= 0.15 for s in share.values()), share
    assert not {p.concept for p in train.pairs} & {p.concept for p in validation.pairs}
