"""Few-shot draws (Dassl's rule, seeded) and base/novel halves, computed from the manifest."""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict

import pytest

from data_shards import DataError, open_dataset
from data_shards.dataset import base_novel_classes
from tests.data_shards.layouts import make_image, write_coop


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


def dassl_subsample_classes(*args, subsample="all"):
    """CoOp's OxfordPets.subsample_classes (datasets/oxford_pets.py), as CoOp writes it, on (key, label) items:
    the labels present in the first list (train), sorted, cut at ceil(n/2); labels relabelled 0..m-1."""
    assert subsample in ["all", "base", "new"]
    if subsample == "all":
        return args
    dataset = args[0]
    labels = set()
    for item in dataset:
        labels.add(item[1])
    labels = list(labels)
    labels.sort()
    n = len(labels)
    m = math.ceil(n / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    output = []
    for dataset in args:
        dataset_new = []
        for key, label in dataset:
            if label not in selected:
                continue
            dataset_new.append((key, relabeler[label]))
        output.append(dataset_new)
    return output


def dassl_fewshot_items(items, shots):
    labels = dict(items)
    return [(k, labels[k]) for k in dassl_fewshot(items, shots)]


def _write_folder(root, splits):
    n = 0
    for split, per_class in splits.items():
        for c, k in per_class.items():
            for i in range(k):
                make_image(root / split / c / f"{i}.png", n)
                n += 1
    return root


def test_base_novel_cut_counts_the_classes_present_in_train_as_dassl(tmp_path):
    """Class 'c' has test images but none in train: Dassl cuts the 4 train classes 2/2 (not 5 names 3/2) and
    drops 'c' from both halves."""
    from data_shards.builder import BuildOptions, build

    root = _write_folder(tmp_path / "pics", {"train": {"a": 3, "b": 3, "d": 3, "e": 3}, "val": {"a": 1, "b": 1, "d": 1, "e": 1},
                                             "test": {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}})
    build("imagefolder", root, tmp_path / "five", BuildOptions(image_size=16), progress=False)
    ds = open_dataset(tmp_path / "five")
    assert ds.classnames == ("a", "b", "c", "d", "e")
    for subsample, classes, names in (("base", "base", ("a", "b")), ("new", "novel", ("d", "e"))):
        for shots, seed in ((1, 1), (2, 3)):
            random.seed(seed)
            ref_train = dassl_fewshot_items(split_items(ds, "train"), shots)
            ref_val = dassl_fewshot_items(split_items(ds, "val"), min(shots, 4))
            ref = dassl_subsample_classes(ref_train, ref_val, split_items(ds, "test"), subsample=subsample)
            for split, expected in zip(("train", "val", "test"), ref):
                sub = ds.select(split, shots=None if split == "test" else shots, seed=seed, classes=classes)
                assert list(zip(sub.keys, sub.labels.tolist())) == expected, (split, subsample)
                assert sub.classnames == names
    assert base_novel_classes(5, "base", present=[0, 1, 3, 4]) == [0, 1]  # counting all 5 names gives [0, 1, 2]
    assert base_novel_classes(5, "novel", present=[0, 1, 3, 4]) == [3, 4]


def test_skip_bad_keeps_the_entry_so_draws_equal_dassl_then_leaves_it_out(tmp_path):
    """A broken train image and a broken val image: the draws over train and val equal Dassl's (which keeps
    both entries), the bad ones are then left out of what loads, with a warning giving the count."""
    from data_shards.builder import BuildOptions, build
    from data_shards.dataset import BadImagesLeftOut

    data = tmp_path / "DATA"
    split = write_coop(data, "oxford_pets", "images", "OxfordPets", ["a", "b", "c"], per_split=(4, 3, 1))
    bad_paths = {split["train"][1][0], split["val"][4][0]}  # class a's 2nd train image, class b's 2nd val image
    for rel in bad_paths:
        (data / "oxford_pets" / "images" / rel).write_bytes(b"\xff\xd8 truncated jpeg")
    build("oxford_pets", data, tmp_path / "pets", BuildOptions(image_size=16, skip_bad=True), progress=False)
    ds = open_dataset(tmp_path / "pets")
    rows = ds.manifest.to_pylist()
    bad_keys = {r["key"] for r in rows if r["path"] in bad_paths}
    assert len(bad_keys) == 2 and all(r["bad"] == (r["key"] in bad_keys) for r in rows)
    shifted = 0
    for shots in (1, 2, 4):
        for seed in (1, 2, 3):
            random.seed(seed)
            ref_train = dassl_fewshot(split_items(ds, "train"), shots)
            ref_val = dassl_fewshot(split_items(ds, "val"), min(shots, 4))
            # Dropping the bad entries before the draw (the old --skip-bad) shifts later classes' draws.
            random.seed(seed)
            good = lambda s: [(k, y) for k, y in split_items(ds, s) if k not in bad_keys]
            old_train, old_val = dassl_fewshot(good("train"), shots), dassl_fewshot(good("val"), min(shots, 4))
            shifted += [k for k in ref_train + ref_val if k not in bad_keys] != old_train + old_val
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train = ds.select("train", shots=shots, seed=seed)
                val = ds.select("val", shots=shots, seed=seed)
            assert list(train.keys) == [k for k in ref_train if k not in bad_keys]
            assert list(val.keys) == [k for k in ref_val if k not in bad_keys]
            drawn_bad = [k for k in ref_train + ref_val if k in bad_keys]
            assert train.left_out + val.left_out == len(drawn_bad)
            left = [w for w in caught if issubclass(w.category, BadImagesLeftOut)]
            assert len(left) == (train.left_out > 0) + (val.left_out > 0)
            assert all("1 image(s)" in str(w.message) and "left out" in str(w.message) for w in left)
    assert shifted > 0
    with pytest.warns(BadImagesLeftOut, match="1 image\\(s\\) of this train selection \\(shots=4, seed=1"):
        assert len(ds.select("train", shots=4, seed=1)) == 11  # every train image drawn; the bad one left out
