"""One name rule and one inside-this-folder check, shared by every node (``comfyui_safetydpo.names``)."""

from __future__ import annotations

import os

import pytest

from comfyui_safetydpo import names
from comfyui_safetydpo.errors import DatasetError, LoraFormatError, TrainingError


@pytest.mark.parametrize("text, expected", [("safety_expert", "safety_expert"), ("  my pairs v2 ", "my_pairs_v2"),
                                            ("Gewalt: Messer!", "Gewalt_Messer"), ("run.1-a", "run.1-a"),
                                            ("__x__", "x")])
def test_safe_name_keeps_letters_digits_and_replaces_the_rest(text, expected):
    assert names.safe_name(text, "expert_name") == expected


@pytest.mark.parametrize("text", ["../escape", "a/b", "a\\b", "..", "x..y"])
def test_safe_name_refuses_paths_with_the_callers_error(text):
    with pytest.raises(DatasetError, match=r"dataset name .* is a path"):
        names.safe_name(text, "dataset name", DatasetError)


@pytest.mark.parametrize("text", ["", "   ", "!!!", "._"])
def test_safe_name_needs_letters_or_digits(text):
    with pytest.raises(TrainingError, match="expert_name .* must contain letters or digits"):
        names.safe_name(text, "expert_name", TrainingError)


def test_path_inside_accepts_relative_and_absolute_inside_and_refuses_the_rest(tmp_path):
    root = tmp_path / "input"
    (root / "lists").mkdir(parents=True)
    (tmp_path / "secret.csv").write_text("x")
    assert (names.path_inside(root, "lists/a.csv", "prompt file", "the input folder")
            == root.resolve() / "lists" / "a.csv")
    assert names.path_inside(root, str(root / "lists"), "f", "the input folder") == (root / "lists").resolve()
    os.symlink(tmp_path / "secret.csv", root / "link.csv")  # a link that leads outside is outside
    for name in ("../secret.csv", str(tmp_path / "secret.csv"), "lists/../../secret.csv", "link.csv", "."):
        with pytest.raises(DatasetError, match=f"prompt file {name!r} must be inside the input folder"):
            names.path_inside(root, name, "prompt file", "the input folder", DatasetError)
        assert not names.is_inside(root, name)


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../x", "C:/x", "a\x00b", ""])
def test_relative_name_refuses_what_could_leave_a_model_folder(name):
    with pytest.raises(LoraFormatError, match="dropdown"):
        names.relative_name(name, "expert file", LoraFormatError)
    assert names.relative_name("sub\\x.safetensors", "expert file") == "sub/x.safetensors"
