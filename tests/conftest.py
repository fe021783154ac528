"""Suite-wide collection rule: tests marked `gpu` are deselected where CUDA (or enough GPUs) is missing.

Deselected, not skipped: a CPU run neither counts them as passed nor reports them as skipped, and
`pytest -m gpu` on a CPU machine ends with "N deselected" and no test run. On a machine with CUDA they
run like any other test. `@pytest.mark.gpu(devices=2)` needs two visible GPUs.
This file imports nothing beyond pytest at import time (torch only when a gpu test is collected), so the
GPU check (scripts/gpu_check.sh) can collect tests/gpu on a machine without Ray, MLflow or Optuna.
"""

from __future__ import annotations

import pytest


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without a CUDA build, a driver or a visible device)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_needed(item: pytest.Item) -> int:
    """0 for a test without the gpu mark, else its `devices` (default 1)."""
    mark = item.get_closest_marker("gpu")
    if mark is None:
        return 0
    devices = mark.kwargs.get("devices", mark.args[0] if mark.args else 1)
    if not isinstance(devices, int) or devices < 1:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.gpu(devices=...) expects an int >= 1, got {devices!r}")
    return devices


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = [gpus_needed(item) for item in items]
    if not any(needs):
        return
    have = visible_gpus()
    keep = [item for item, n in zip(items, needs) if n <= have]
    dropped = [item for item, n in zip(items, needs) if n > have]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
