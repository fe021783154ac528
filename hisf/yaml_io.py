"""Reading YAML that users write (experiment specs, trial configs, `--set` values): safe, and strict about duplicate keys.

PyYAML's safe loader keeps the last of two equal keys in a mapping without a word, so a spec with
`shots: 4` and, further down, `shots: 16` would run with 16 shots. Here that is an error naming both lines.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice; the message gives both lines (1-based)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (plain data only, no Python objects) that refuses duplicated mapping keys.

    Keys merged in with `<<: *anchor` are not duplicates: YAML lets the mapping's own keys override them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader's own error says so below
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r} at {_where(key_node.start_mark, first)}; "
                                                        "remove one (YAML would silently keep the last)")
        return super().construct_mapping(node, deep=deep)


def _where(mark: yaml.Mark, first: yaml.Mark) -> str:
    if mark.line == first.line:  # a flow mapping on one line: the columns tell them apart
        return f"line {mark.line + 1}, column {mark.column + 1} (first at column {first.column + 1})"
    return f"line {mark.line + 1} (first at line {first.line + 1})"


def load_yaml(text: str) -> Any:
    """Parse YAML text with UniqueKeyLoader; raises yaml.YAMLError (DuplicateKeyError for a repeated key)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_error(e: yaml.YAMLError) -> str:
    """One line for a YAML error: ours as written; PyYAML's own with its line and column."""
    if isinstance(e, DuplicateKeyError):
        return e.problem
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        at = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        context = f" ({e.context} started at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        return f"{e.problem}{at}{context}"
    return " ".join(str(e).split())
