"""Class descriptions for HiCroPL's text teacher: a JSON file, a folder of CoPrompt files, or CLIP's templates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from hisf.config import ConfigError

TEMPLATES = "templates"
# Our catalogue key -> the stem of CoPrompt's `gpt_file/<stem>_prompt.json` (the released HiCroPL code maps
# Dassl dataset names to these stems); a dataset not listed (custom, demo) reads `<key>_prompt.json`.
COPROMPT_STEMS = {
    "caltech101": "caltech",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "fgvc_aircraft": "fgvc",
    "food101": "food101",
    "imagenet": "imagenet",
    "imagenet_a": "imagenet_a",
    "imagenet_r": "imagenet_r",
    "imagenet_sketch": "imagenet_sketch",
    "imagenetv2": "imagenetv2",
    "oxford_flowers": "oxford_flowers",
    "oxford_pets": "oxford_pets",
    "stanford_cars": "stanford_cars",
    "sun397": "sun397",
    "ucf101": "ucf101",
}


class DescriptionsError(ConfigError):
    """A descriptions source is unreadable, malformed, or lacks a class; the message names the file and class."""


def coprompt_file(folder: str | Path, dataset: str) -> Path:
    """The CoPrompt-style file a folder holds for our dataset key (`caltech101` -> `caltech_prompt.json`)."""
    return Path(folder) / f"{COPROMPT_STEMS.get(dataset, dataset)}_prompt.json"


def match_key(name: str) -> str:
    """The form class names are compared in: case-insensitive, `_` and runs of spaces count as one space.

    The released code looks `name.replace("_", " ")` up exactly; CoPrompt's keys differ from Dassl's names only
    in case and separators for some datasets (our catalogue cleans names the same way), so this finds every
    key the released lookup finds, and the same sentences.
    """
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().casefold()


def resolve_descriptions(source: str, dataset: str, classnames: Sequence[str]) -> dict[str, list[str]]:
    """{class name: its non-empty list of sentences} for every name in `classnames`, in that order.

    `source`: `templates` (CLIP's 80 ImageNet templates filled with the name), a JSON file
    `{class name: [sentences]}`, or a folder of CoPrompt files `<stem>_prompt.json` (see COPROMPT_STEMS).
    """
    if isinstance(classnames, str) or not classnames:
        raise DescriptionsError(f"classnames: expected a non-empty list of class names, got {classnames!r}")
    if source == TEMPLATES:
        return {name: [t(name.replace("_", " ")) for t in OPENAI_IMAGENET_TEMPLATES] for name in classnames}
    path = _source_file(source, dataset)
    table = _read_table(path)
    return _lookup(table, path, classnames)


def check_descriptions(source: str, dataset: str, classnames: Sequence[str]) -> None:
    """Raise DescriptionsError if `resolve_descriptions` would (spec validation, before Ray starts)."""
    resolve_descriptions(source, dataset, classnames)


def _source_file(source: str, dataset: str) -> Path:
    if not isinstance(source, str) or not source:
        raise DescriptionsError(
            f"method.descriptions: expected {TEMPLATES!r}, a JSON file or a folder of <name>_prompt.json files, "
            f"got {source!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        if not dataset:
            raise DescriptionsError(f"{path}: a descriptions folder needs the dataset key to pick its file")
        file = coprompt_file(path, dataset)
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*_prompt.json"))
            raise DescriptionsError(
                f"{path}: no descriptions file {file.name!r} for dataset {dataset!r}; the folder has {found[:20]}")
        return file
    if not path.is_file():
        raise DescriptionsError(
            f"method.descriptions: {source!r} is neither {TEMPLATES!r} nor an existing JSON file or folder")
    return path


def _read_table(path: Path) -> dict[str, list[str]]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DescriptionsError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(table, dict):
        raise DescriptionsError(
            f"{path}: expected a JSON object {{class name: [sentences]}}, got a {type(table).__name__}")
    for name, sentences in table.items():
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise DescriptionsError(
                f"{path}: class {name!r}: expected a list of sentences (strings), got {json.dumps(sentences)[:80]}")
    return table


def _lookup(table: Mapping[str, list[str]], path: Path, classnames: Sequence[str]) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for key in table:
        by_key.setdefault(match_key(key), []).append(key)
    out: dict[str, list[str]] = {}
    for name in classnames:
        keys = by_key.get(match_key(name), [])
        if len(keys) > 1:
            # Two file keys differ only in case or separators: take the one spelled as the released code would.
            keys = [k for k in keys if k == name.replace("_", " ")] or keys
            if len(keys) > 1:
                raise DescriptionsError(f"{path}: class {name!r} matches several keys {keys}; keep one of them")
        if not keys:
            near = sorted(k for k in table if match_key(k)[:3] == match_key(name)[:3])[:5]
            raise DescriptionsError(
                f"{path}: no description for class {name!r} (compared case- and '_'-insensitively)"
                + (f"; similar keys: {near}" if near else f"; the file has {len(table)} classes"))
        sentences = table[keys[0]]
        if not sentences:
            raise DescriptionsError(f"{path}: class {name!r} (key {keys[0]!r}) has an empty sentence list")
        blank = [i for i, s in enumerate(sentences) if not s.strip()]
        if blank:
            raise DescriptionsError(f"{path}: class {name!r} (key {keys[0]!r}): sentence {blank[0]} is empty")
        out[name] = list(sentences)
    return out
