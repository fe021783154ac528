"""The test tree mirrors the packages: a folder per package it tests, no file name repeating its folder's package,
helpers imported by their package path, no test module imported by another, shared helpers written once."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

TESTS = ROOT / "tests"
# Test folders that stand for no package: the whole demo end to end, and the CUDA tests (run alone on GPU machines).
NOT_PACKAGES = {"e2e", "gpu"}
# What tests/support.py owns: written anywhere else, it is written twice.
SHARED = {"free_port", "child_env", "torchrun", "build_demo_shards"}


def tree_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path) -> list[str]:
    """Every module an import statement of the file names (absolute, as written), lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}: relative import; write `from tests.<package> import ...`"
            out += [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
    return out


def test_every_test_folder_mirrors_a_package_folder():
    folders = {p.parent for p in tree_files()} - {TESTS}
    assert len(folders) >= 8
    for folder in folders:
        rel = folder.relative_to(TESTS)
        if rel.parts[0] in NOT_PACKAGES:
            continue
        assert (ROOT / rel / "__init__.py").is_file(), f"tests/{rel}: no package {rel.as_posix().replace('/', '.')}"
        assert (folder / "__init__.py").is_file(), f"tests/{rel}: no __init__.py (helpers import as tests.<package>)"


def test_no_test_file_repeats_its_package_in_its_name():
    for path in tree_files():
        rel = path.relative_to(TESTS)
        for package in rel.parts[:-1]:
            assert not path.name.startswith(f"test_{package}_"), f"tests/{rel}: `{package}_` repeats its folder"


def test_no_test_module_imports_another_and_helpers_import_by_package_path():
    test_modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in tree_files() if p.name.startswith("test_")}
    local = {p.stem for p in tree_files()}
    for path in tree_files():
        for name in imports(path):
            rel = path.relative_to(ROOT)
            assert name not in test_modules, f"{rel}: imports the test module {name}; move what it shares to a helper"
            assert name.split(".")[0] not in local, f"{rel}: `import {name}` by file name; write tests.<package>.{name}"


def test_shared_helpers_are_written_once():
    defined: dict[str, list[str]] = {}
    for path in tree_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in SHARED:
                defined.setdefault(node.name.lstrip("_"), []).append(str(path.relative_to(ROOT)))
    assert defined == {name: ["tests/support.py"] for name in SHARED}
