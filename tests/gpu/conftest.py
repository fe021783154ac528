"""Fixtures for the CUDA tests: the device, a tiny prompt model on it, demo shards, deterministic CUDA flags.

Every module here sets `pytestmark = pytest.mark.gpu` (tests/conftest.py deselects them without CUDA). Nothing here imports
Ray, MLflow or Optuna: scripts/gpu_check.sh runs this folder on GPU machines that have none of them.
"""

from __future__ import annotations

import pytest
import torch

# The engine tests' helpers (TinyPromptModel, tiny trial configs, demo shards, free ports) are shared, not copied.
from tests.gpu.helpers import deterministic_flags
from tests.hisf.engine.helpers import build_demo


@pytest.fixture
def cuda() -> torch.device:
    return torch.device("cuda", 0)


@pytest.fixture
def deterministic():
    """CUDA's deterministic mode for one test (atomics-free kernels, no TF32), restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    deterministic_flags()
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Demo images as real PNG files in CoOp's layout, built into shards at ROOT/demo (6 classes, 32 px)."""
    return build_demo(tmp_path_factory.mktemp("demo"), classes=6, train=8, val=4, test=6, size=40, image_size=32)
