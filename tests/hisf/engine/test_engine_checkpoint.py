"""Atomic checkpoint writes, RNG round trips, config/class-set checks on resume, prompt export."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from hisf.engine import checkpoint as ckpt
from hisf.config import ConfigError, TrialConfig, replace_path


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "state.pt"
    ckpt.atomic_save({"x": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.atomic_save({"x": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(3); np.random.seed(3); torch.manual_seed(3)
    ckpt.atomic_save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _state(cfg, names):
    return {"identity": ckpt.identity(cfg), "classnames": list(names), "epoch": 2}


def test_load_checkpoint_checks_config_and_classes(tmp_path):
    cfg = TrialConfig(output_dir=str(tmp_path))
    names = ("cat", "dog")
    assert ckpt.load_checkpoint(tmp_path, cfg, names) is None
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / ".state.pt.abc123.tmp").write_bytes(b"half a checkpoint from a killed writer")
    ckpt.save_checkpoint(tmp_path, _state(cfg, names))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["state.pt"]
    assert ckpt.load_checkpoint(tmp_path, cfg, names)["epoch"] == 2
    # Runtime-only keys may change between a kill and the restart.
    moved = replace_path(replace_path(cfg, "device", "cpu"), "data.num_workers", 2)
    assert ckpt.load_checkpoint(tmp_path, moved, names)["epoch"] == 2
    # ... so may where the backbone's weights are cached (`--weights-cache` on the rerun), not which they are.
    assert ckpt.load_checkpoint(tmp_path, replace_path(cfg, "backbone.cache_dir", "/shared/w"), names)["epoch"] == 2
    with pytest.raises(ConfigError, match=r"backbone.pretrained is 'openai' there, 'laion2b' now"):
        ckpt.load_checkpoint(tmp_path, replace_path(cfg, "backbone.pretrained", "laion2b"), names)
    with pytest.raises(ConfigError, match=r"method.lambda_le is 1.0 there, 0.5 now"):
        ckpt.load_checkpoint(tmp_path, replace_path(cfg, "method.lambda_le", 0.5), names)
    with pytest.raises(ConfigError, match=r"data.dataset is 'caltech101' there, 'dtd' now"):
        ckpt.load_checkpoint(tmp_path, replace_path(cfg, "data.dataset", "dtd"), names)
    with pytest.raises(ConfigError, match=r"class set \(2 classes.*\(3, first"):
        ckpt.load_checkpoint(tmp_path, cfg, ("cat", "dog", "bird"))


def test_export_and_load_prompts(tmp_path, tiny_model):
    cfg = TrialConfig()
    path = ckpt.export_prompts(tmp_path / "prompts.pt", tiny_model.trainable_state_dict(), cfg, ("a", "b", "c"))
    assert path.stat().st_size < 50_000
    from engine_helpers import TinyPromptModel

    other = TinyPromptModel(seed=5)
    assert not torch.equal(other.prompt, tiny_model.prompt)
    payload = ckpt.load_prompts(path, other, cfg)
    assert payload["classnames"] == ["a", "b", "c"]
    for k, v in tiny_model.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[k], v)
    with pytest.raises(ConfigError, match="different method config"):
        ckpt.load_prompts(path, other, replace_path(cfg, "method.depth", 3))
    assert ckpt.load_prompts(path, other, replace_path(cfg, "backbone.cache_dir", "/elsewhere"))["classnames"] == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load_prompts(tmp_path / "missing.pt", other)
