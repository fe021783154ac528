"""HiCroPL's class descriptions: JSON files, CoPrompt folders, CLIP's templates, and every bad input."""

from __future__ import annotations

import json

import pytest
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from hisf.config import ConfigError
from hisf.model.descriptions import (
    COPROMPT_STEMS,
    DescriptionsError,
    check_descriptions,
    coprompt_file,
    resolve_descriptions,
)

CLASSES = ("golden_retriever", "tabby cat", "Airliner")


def write(path, table):
    path.write_text(json.dumps(table) if not isinstance(table, str) else table)
    return path


def test_templates_are_clips_80():
    out = resolve_descriptions("templates", "anything", CLASSES)
    assert list(out) == list(CLASSES)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert all(len(v) == 80 for v in out.values())
    assert out["golden_retriever"][0] == "a bad photo of a golden retriever."
    assert out["tabby cat"][-1] == "a tattoo of the tabby cat."
    assert len(set(out["Airliner"])) == 80


def test_json_file_matches_names_case_and_separator_insensitively(tmp_path):
    table = {"Golden Retriever": ["a dog with a golden coat.", "a friendly retriever."],
             "tabby_cat": ["a striped cat."], "airliner": ["a large passenger plane."], "unused": []}
    out = resolve_descriptions(str(write(tmp_path / "d.json", table)), "custom", CLASSES)
    assert out == {"golden_retriever": table["Golden Retriever"], "tabby cat": ["a striped cat."],
                   "Airliner": ["a large passenger plane."]}
    check_descriptions(str(tmp_path / "d.json"), "custom", CLASSES)


def test_exact_spelling_wins_over_a_case_variant(tmp_path):
    path = write(tmp_path / "d.json", {"tabby cat": ["exact."], "Tabby Cat": ["variant."], "golden retriever": ["g."],
                                        "airliner": ["a."]})
    assert resolve_descriptions(str(path), "x", CLASSES)["tabby cat"] == ["exact."]
    path = write(tmp_path / "e.json", {"Tabby cat": ["one."], "TABBY CAT": ["two."]})
    with pytest.raises(DescriptionsError, match=r"class 'tabby cat' matches several keys \['Tabby cat', 'TABBY CAT'\]"):
        resolve_descriptions(str(path), "x", ["tabby cat"])


def test_coprompt_folder_picks_the_datasets_file(tmp_path):
    assert COPROMPT_STEMS["caltech101"] == "caltech" and COPROMPT_STEMS["fgvc_aircraft"] == "fgvc"
    assert len(COPROMPT_STEMS) == 15
    write(tmp_path / "caltech_prompt.json", {"face": ["a face."], "leopard": ["a spotted cat."]})
    write(tmp_path / "fgvc_prompt.json", {"707-320": ["a Boeing jet."]})
    write(tmp_path / "demo_prompt.json", {"red circle": ["a red round shape."]})
    assert coprompt_file(tmp_path, "caltech101") == tmp_path / "caltech_prompt.json"
    assert resolve_descriptions(str(tmp_path), "caltech101", ["leopard", "face"]) == {
        "leopard": ["a spotted cat."], "face": ["a face."]}
    assert resolve_descriptions(str(tmp_path), "fgvc_aircraft", ["707-320"]) == {"707-320": ["a Boeing jet."]}
    # A custom (or demo) dataset reads <key>_prompt.json.
    assert resolve_descriptions(str(tmp_path), "demo", ["red_circle"]) == {"red_circle": ["a red round shape."]}
    with pytest.raises(DescriptionsError, match=r"no descriptions file 'dtd_prompt.json' for dataset 'dtd'.*caltech_prompt.json"):
        resolve_descriptions(str(tmp_path), "dtd", ["banded"])


@pytest.mark.parametrize("content, message", [
    ("{not json", r"bad\.json: not a readable JSON file"),
    (["a", "b"], r"bad\.json: expected a JSON object \{class name: \[sentences\]\}, got a list"),
    ({"face": "a face."}, r"bad\.json: class 'face': expected a list of sentences \(strings\), got \"a face.\""),
    ({"face": ["ok", 3]}, r"class 'face': expected a list of sentences"),
    ({"face": [], "leopard": ["x"]}, r"bad\.json: class 'face' \(key 'face'\) has an empty sentence list"),
    ({"face": ["ok", "  "], "leopard": ["x"]}, r"class 'face' \(key 'face'\): sentence 1 is empty"),
    ({"face": ["ok"], "leopards": ["x"]}, r"bad\.json: no description for class 'leopard'.*similar keys: \['leopards'\]"),
])
def test_bad_files_name_the_file_and_class(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(DescriptionsError, match=message):
        resolve_descriptions(str(path), "caltech101", ["face", "leopard"])
    with pytest.raises(DescriptionsError, match=message):
        check_descriptions(str(path), "caltech101", ["face", "leopard"])


def test_bad_sources(tmp_path):
    assert issubclass(DescriptionsError, ConfigError)
    with pytest.raises(DescriptionsError, match=r"'nope.json' is neither 'templates' nor an existing JSON file or folder"):
        resolve_descriptions("nope.json", "dtd", ["banded"])
    with pytest.raises(DescriptionsError, match="method.descriptions: expected 'templates'"):
        resolve_descriptions("", "dtd", ["banded"])
    with pytest.raises(DescriptionsError, match="non-empty list of class names"):
        resolve_descriptions("templates", "dtd", [])
