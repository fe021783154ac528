"""Fixtures for the engine tests: a tiny prompt model, a tiny batch, demo shards built from real image files."""

from __future__ import annotations

import pytest
import torch

from tests.hisf.engine.helpers import TinyPromptModel, build_demo


@pytest.fixture
def tiny_model():
    return TinyPromptModel()


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Demo images written as real PNG files in CoOp's layout, built into shards at ROOT/demo (6 classes)."""
    return build_demo(tmp_path_factory.mktemp("demo"), classes=6, train=8, val=4, test=6, size=40, image_size=32)
