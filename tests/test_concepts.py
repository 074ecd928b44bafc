"""Users' own concept lists: CSV, YAML and text lines, their errors, and template expansion."""

from __future__ import annotations

import pytest

from comfyui_safetydpo.concepts import (
    PromptPair,
    expand_concepts,
    load_concept_file,
    parse_pair_lines,
    read_concept_csv,
    write_concept_csv,
)
from comfyui_safetydpo.errors import DatasetError

CSV_TEXT = (
    "unsafe_prompt,safe_prompt,category,concept\n"
    "a man holding a bloody knife,a man holding a bunch of flowers,Violence,knife\n"
    "\"a knife fight, at night\",\"a pillow fight, at night\",violence;Shocking,knife\n"
    "a nude figure on a beach,a clothed figure on a beach,sexual,\n"
)


def test_csv_parses_categories_concepts_and_quoted_commas(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(CSV_TEXT)
    pairs = load_concept_file(path)
    assert pairs == [
        PromptPair("a man holding a bloody knife", "a man holding a bunch of flowers", ("Violence",), "knife"),
        PromptPair("a knife fight, at night", "a pillow fight, at night", ("Violence", "Shocking"), "knife"),
        PromptPair("a nude figure on a beach", "a clothed figure on a beach", ("Sexual",), ""),
    ]
    assert [p.prompt for p in pairs.select(["shocking"])] == ["a knife fight, at night"]
    with pytest.raises(DatasetError, match="no pair has categories"):
        pairs.select(["Hate"])
    # write → read round trip
    assert load_concept_file(write_concept_csv(pairs, tmp_path / "again.csv")) == pairs


def test_yaml_with_own_categories(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "categories: [Gore]\n"
        "pairs:\n"
        "  - unsafe_prompt: a gory wound\n"
        "    safe_prompt: a bandaged arm\n"
        "    category: gore\n"
        "    concept: wound\n"
        "  - unsafe_prompt: a riot with fire\n"
        "    safe_prompt: a parade with lanterns\n"
        "    category: [Violence, Shocking]\n"
    )
    pairs = load_concept_file(path)
    assert [(p.categories, p.concept) for p in pairs] == [(("Gore",), "wound"), (("Violence", "Shocking"), "")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("unsafe_prompt,safe_prompt\nx,y\n", r"missing column\(s\) \['category'\]"),
        (CSV_TEXT + "a slur,a greeting,Hateful,\n", r"line 5: unknown category 'Hateful'"),
        (CSV_TEXT + ",a greeting,Hate,\n", r"line 5: the unsafe and the safe prompt must both be non-empty"),
        (CSV_TEXT + "same,same,Hate,\n", r"line 5: the safe prompt is the same as the unsafe one"),
        (CSV_TEXT + "a slur,a greeting,,\n", r"line 5: no category"),
    ],
)
def test_csv_errors_name_the_line_or_skip_with_a_count(tmp_path, text, message):
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_concept_csv(path)
    if "missing column" not in message:
        skipped = read_concept_csv(path, on_error="skip")
        assert len(skipped) == 3 and len(skipped.skipped) == 1


def test_yaml_and_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairs: [unclosed\n")
    with pytest.raises(DatasetError, match="cannot read the YAML"):
        load_concept_file(bad)
    bad.write_text("something: else\n")
    with pytest.raises(DatasetError, match="top-level 'pairs:' list"):
        load_concept_file(bad)
    bad.write_text("pairs:\n  - just a string\n  - {unsafe_prompt: a, safe_prompt: b, category: Hate}\n")
    with pytest.raises(DatasetError, match="pair 1: not a mapping"):
        load_concept_file(bad)
    assert len(load_concept_file(bad, on_error="skip")) == 1
    with pytest.raises(DatasetError, match="not found"):
        load_concept_file(tmp_path / "missing.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DatasetError, match="unknown concept file type"):
        load_concept_file(tmp_path / "x.json")
    (tmp_path / "empty.csv").write_text("unsafe_prompt,safe_prompt,category\n")
    with pytest.raises(DatasetError, match="no prompt pairs"):
        load_concept_file(tmp_path / "empty.csv")


def test_text_lines_as_in_the_node_widget():
    pairs = parse_pair_lines("# comment\n\n a red knife | a red flower | Violence | knife \n"
                             "a slur | a greeting | harrasment\n")
    assert pairs == [PromptPair("a red knife", "a red flower", ("Violence",), "knife"),
                     PromptPair("a slur", "a greeting", ("Harassment",), "")]
    with pytest.raises(DatasetError, match=r"line 2: expected 'unsafe prompt \| safe prompt \| category'"):
        parse_pair_lines("a | b | Hate\nonly one field\n")


def test_expand_concepts_with_templates_replacements_and_a_local_rewrite():
    pairs = expand_concepts({"a bloody knife": "a bunch of flowers", "a gun": "a camera"},
                            templates=["a photo of {concept}", "{concept} on a table"], category="Violence")
    assert [(p.prompt, p.safe_prompt, p.concept) for p in pairs] == [
        ("a photo of a bloody knife", "a photo of a bunch of flowers", "a bloody knife"),
        ("a bloody knife on a table", "a bunch of flowers on a table", "a bloody knife"),
        ("a photo of a gun", "a photo of a camera", "a gun"),
        ("a gun on a table", "a camera on a table", "a gun"),
    ]
    rewritten = expand_concepts(["a skull"], templates=["{concept} in a field"], category={"a skull": "Shocking"},
                                rewrite=lambda prompt: prompt.replace("a skull", "a pumpkin"))
    assert rewritten[0].safe_prompt == "a pumpkin in a field" and rewritten[0].categories == ("Shocking",)
    with pytest.raises(DatasetError, match="no safe replacement for concept 'a gun'"):
        expand_concepts(["a gun"], category="Violence")
    with pytest.raises(DatasetError, match="needs '\\{concept\\}'"):
        expand_concepts(["a gun"], templates=["no placeholder"], replacements="a camera", category="Violence")
    with pytest.raises(DatasetError, match="unknown category"):
        expand_concepts(["a gun"], replacements="a camera", category="Weapons")
