"""Fixtures for orchestrator tests: demo shards built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Real demo images (data_shards.demo) converted to shards: DATA/demo/manifest.parquet."""
    from data_shards.cli import main as data_main

    root = tmp_path_factory.mktemp("shards")
    raw = tmp_path_factory.mktemp("raw")
    assert data_main(["demo", "--out", str(raw)]) in (0, None)
    assert data_main(["build", "--dataset", "demo", "--root", str(raw), "--out", str(root / "demo"),
                      "--image-size", "32", "--quiet"]) in (0, None)
    return root
