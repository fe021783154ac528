"""Tiny on-disk fixture datasets in every source layout, written as real image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_shards.builder import BuildOptions, build
from data_shards.demo import write_demo


@pytest.fixture(scope="session")
def demo_built(tmp_path_factory) -> Path:
    """The demo dataset (6 classes; 10/3/7 per class) built at 32 px into small shards that do not divide evenly."""
    base = tmp_path_factory.mktemp("demo")
    write_demo(base / "DATA", n_classes=6, train=10, val=3, test=7, size=40)
    out = base / "built" / "demo"
    build("demo", base / "DATA", out, BuildOptions(image_size=32, shard_size=16384), progress=False)
    return out
