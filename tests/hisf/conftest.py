"""Fixtures for the method library's tests: a tiny open_clip CLIP written to a local checkpoint, tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hisf.config import BackboneConfig
from hisf.model.backbone import MODEL_CONFIG_DIR, load_backbone

torch.set_num_threads(1)



@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return json.loads((MODEL_CONFIG_DIR / "hisf-tiny.json").read_text())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny CLIP's weights as a plain state dict file (OpenAI/open_clip key layout), random but fixed."""
    from open_clip.model import CLIP

    torch.manual_seed(1234)
    cfg = json.loads((MODEL_CONFIG_DIR / "hisf-tiny.json").read_text())
    model = CLIP(**cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def backbone(tiny_ckpt):
    return load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(tiny_ckpt)))


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 3, 32, 32, generator=g)


@pytest.fixture
def labels():
    return torch.tensor([0, 1, 2, 1])


@pytest.fixture
def classes():
    return ("golden_retriever", "tabby cat", "airliner")


@pytest.fixture
def novel():
    return ("sea turtle", "red fox")
