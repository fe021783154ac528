"""Class descriptions for HiCroPL's text teacher: CLIP's 80 templates or a `{class: [sentences]}` JSON file.

Minimal version (templates + one JSON file); the full module with CoPrompt folders replaces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from hisf.config import ConfigError

TEMPLATES = "templates"


class DescriptionsError(ConfigError):
    """A descriptions source is unreadable or lacks a class; the message names the file and the class."""


def _templates() -> list:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def resolve_descriptions(source: str, dataset: str | None, classnames: Sequence[str]) -> dict[str, list[str]]:
    """{class name: non-empty list of sentences} for every name in `classnames`."""
    names = [str(n) for n in classnames]
    if source == TEMPLATES:
        templates = _templates()
        return {n: [t(n) for t in templates] for n in names}
    path = Path(source)
    if not path.is_file():
        raise DescriptionsError(f"method.descriptions: {source!r} is neither `templates` nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DescriptionsError(f"method.descriptions: {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DescriptionsError(f"method.descriptions: {path}: expected {{class name: [sentences]}}, "
                                f"got {type(data).__name__}")
    out = {}
    for n in names:
        sentences = data.get(n, data.get(n.replace(" ", "_")))
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s for s in sentences):
            raise DescriptionsError(f"method.descriptions: {path}: class {n!r} has no non-empty list of sentences")
        out[n] = list(sentences)
    return out


def check_descriptions(source: str, dataset: str | None, classnames: Sequence[str]) -> None:
    resolve_descriptions(source, dataset, classnames)
