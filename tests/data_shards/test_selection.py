"""Few-shot draws (Dassl's rule, seeded) and base/novel halves, computed from the manifest."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest

from data_shards import DataError, open_dataset
from data_shards.dataset import base_novel_classes


def dassl_fewshot(items: list[tuple[str, int]], num_shots: int) -> list[str]:
    """Dassl's DatasetBase.generate_fewshot_dataset(repeat=False), written as Dassl writes it, on the global RNG."""
    tracker = defaultdict(list)
    for key, label in items:
        tracker[label].append(key)
    out = []
    for label, group in tracker.items():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def split_items(ds, split):
    return [(r["key"], r["label"]) for r in ds.manifest.to_pylist() if r["split"] == split]


@pytest.mark.parametrize("shots,seed", [(1, 1), (4, 2), (16, 3)])
def test_fewshot_matches_dassl_with_the_trial_seed(demo_built, shots, seed):
    ds = open_dataset(demo_built)
    random.seed(seed)  # Dassl seeds the global RNG with cfg.SEED, then draws train, then val (CoOp's datasets)
    ref_train = dassl_fewshot(split_items(ds, "train"), shots)
    ref_val = dassl_fewshot(split_items(ds, "val"), min(shots, 4))
    train = ds.select("train", shots=shots, seed=seed)
    val = ds.select("val", shots=shots, seed=seed)
    assert list(train.keys) == ref_train
    assert list(val.keys) == ref_val
    assert len(train) == 6 * min(shots, 10) and len(set(train.keys)) == len(train)  # fewer than K: all, none repeated
    assert len(val) == 6 * min(shots, 3)
    again = open_dataset(demo_built).select("train", shots=shots, seed=seed)
    assert again.keys == train.keys and (again.labels == train.labels).all()


def test_seeds_draw_different_samples(demo_built):
    ds = open_dataset(demo_built)
    draws = {tuple(ds.select("train", shots=2, seed=s).keys) for s in (1, 2, 3)}
    assert len(draws) == 3


def test_base_novel_halves_relabel(demo_built):
    ds = open_dataset(demo_built)
    base, novel = ds.select("test", classes="base"), ds.select("test", classes="novel")
    assert base.classnames == ds.classnames[:3] and novel.classnames == ds.classnames[3:]
    assert len(base) == len(novel) == 3 * 7
    rows = {r["key"]: r["label"] for r in ds.manifest.to_pylist()}
    assert all(rows[k] == y for k, y in zip(base.keys, base.labels))
    assert all(rows[k] == y + 3 for k, y in zip(novel.keys, novel.labels))
    assert sorted(set(novel.labels.tolist())) == [0, 1, 2]


def test_fewshot_is_drawn_on_all_classes_before_the_halves(demo_built):
    ds = open_dataset(demo_built)
    full = ds.select("train", shots=4, seed=1)
    base = ds.select("train", shots=4, seed=1, classes="base")
    assert list(base.keys) == [k for k, y in zip(full.keys, full.labels) if y < 3]


@pytest.mark.parametrize("n", [1, 2, 5, 10, 47, 100, 397])
def test_base_novel_rule_ceil_half(n):
    base, novel = base_novel_classes(n, "base"), base_novel_classes(n, "novel")
    assert base == list(range(math.ceil(n / 2))) and novel == list(range(math.ceil(n / 2), n))
    assert base_novel_classes(n, "all") == list(range(n))


def test_bad_selection_arguments_are_named(demo_built):
    ds = open_dataset(demo_built)
    with pytest.raises(DataError, match="classes='both'"):
        ds.select("test", classes="both")
    with pytest.raises(DataError, match="shots=0"):
        ds.select("train", shots=0)
    with pytest.raises(DataError, match="split 'validation' not built"):
        ds.select("validation")
