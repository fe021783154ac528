"""The engine's protocol subsets: validation is CoOp's draw (min(K, 4) per class after the K-shot train draw)."""

from __future__ import annotations

import pytest
import torch

from data_shards import open_dataset
from hisf.config import ConfigError
from hisf.engine import run_trial
from hisf.engine.distributed import DistEnv
from hisf.engine.trial_data import open_trial_data
from tests.hisf.engine.helpers import build_demo, tiny_trial


def test_validation_continues_the_k_shot_draw_like_coop(tmp_path):
    # 8 val images per class so the 4 drawn depend on where the seeded RNG stands after the train draw.
    root = build_demo(tmp_path, classes=4, train=12, val=8, test=2)
    ds = open_dataset(root / "demo")
    for shots, seed in ((8, 1), (8, 2), (16, 3)):
        cfg = tiny_trial(root, tmp_path / "out", seed=seed, data={"shots": shots})
        data = open_trial_data(cfg, DistEnv(0, 1, 0, torch.device("cpu"), False))
        expected = ds.select("val", shots=shots, seed=seed, classes="base")
        assert data.val.keys == expected.keys
        assert len(data.val) == 4 * len(data.val.classnames)
        assert data.train.keys == ds.select("train", shots=shots, seed=seed, classes="base").keys
    # The K-shot draw before it matters: drawing val as if K were 4 picks other images for some seed.
    assert any(ds.select("val", shots=8, seed=s).keys != ds.select("val", shots=4, seed=s).keys for s in (1, 2, 3))


def test_search_trials_never_open_the_test_split(tmp_path):
    # A dataset built with no test split at all: a trial that must not read test still runs on it.
    root = build_demo(tmp_path, classes=4, train=6, val=2, test=0)
    assert "test" not in open_dataset(root / "demo").splits
    with pytest.raises(ConfigError, match="no 'test' split"):
        run_trial(tiny_trial(root, tmp_path / "a", train={"epochs": 1}))
    result = run_trial(tiny_trial(root, tmp_path / "b", train={"epochs": 1}, evaluate_test=False))
    assert 0.0 <= result["val_acc"] <= 100.0
    assert not {"base_acc", "novel_acc", "hm", "acc"} & set(result)
