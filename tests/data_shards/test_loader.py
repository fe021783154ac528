"""Loaders: per-rank/per-worker disjointness and completeness, seeded order and augmentation, worker-count invariance."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

from data_shards import DataError, make_loader, open_dataset
from data_shards.images import eval_array, sample_seed, train_array
from tests.data_shards.layouts import MEAN, STD


def stored_bytes(sub, i):
    with open(f"{sub.root}/{sub.shards[i]}", "rb") as f:
        f.seek(int(sub.offsets[i]))
        return f.read(int(sub.sizes[i]))


def normalise(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


def collect(loader):
    images, labels, n = [], [], 0
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
        images.extend(x)
        labels.extend(y.tolist())
        n += 1
    return images, labels, n


SELECTIONS = {  # whole split (streamed), relabelled half (streamed), sparse few-shot draw (read by byte range)
    "all": (dict(split="test"), False),
    "novel": (dict(split="test", classes="novel"), None),
    "sparse": (dict(split="test", shots=1, seed=1), True),
}


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_eval_two_ranks_two_workers_disjoint_and_complete(demo_built, name):
    kwargs, sparse = SELECTIONS[name]
    sub = open_dataset(demo_built).select(**kwargs)
    assert len(sub.shard_files) > 2 and len(sub) % 4 != 0  # shards and batches do not divide evenly
    ref = {}
    for i in range(len(sub)):
        ref[digest(normalise(eval_array(stored_bytes(sub, i), 32)))] = (sub.keys[i], int(sub.labels[i]))
    assert len(ref) == len(sub)
    seen, batches = [], []
    for rank in (0, 1):
        loader = make_loader(sub, train=False, batch_size=4, image_size=32, mean=MEAN, std=STD,
                             rank=rank, world_size=2, num_workers=2)
        images, labels, n = collect(loader)
        assert n == len(loader)
        assert sparse is None or all(loader.dataset._sparse(a, b) == sparse for a, b in loader.dataset.ranges)
        batches.append(n)
        for img, y in zip(images, labels):
            key, label = ref[digest(img)]
            assert y == label
            seen.append(key)
    assert sorted(seen) == sorted(sub.keys)  # every sample once across ranks and workers
    assert abs(batches[0] - batches[1]) <= 1


def test_eval_without_workers_keeps_manifest_order(demo_built):
    sub = open_dataset(demo_built).select("val")
    images, labels, n = collect(make_loader(sub, train=False, batch_size=5, image_size=32, mean=MEAN, std=STD))
    assert n == 4 and labels == sub.labels.tolist()
    for i, img in enumerate(images):
        assert torch.equal(img, normalise(eval_array(stored_bytes(sub, i), 32)))


def train_batches(sub, **kw):
    args = dict(train=True, batch_size=4, image_size=32, mean=MEAN, std=STD, seed=1, epoch=0, rank=0, world_size=1, num_workers=0)
    args.update(kw)
    loader = make_loader(sub, **args)
    out = list(loader)
    assert len(out) == len(loader)
    return out


def test_fewshot_training_identical_across_worker_counts(demo_built):
    sub = open_dataset(demo_built).select("train", shots=4, seed=2, classes="base")
    runs = [train_batches(sub, num_workers=w, seed=2, epoch=1) for w in (0, 1, 2)]
    assert len(runs[0]) == 12 // 4
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for (x0, y0), (x1, y1) in zip(runs[0], other):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_two_ranks_of_b_equal_one_rank_of_2b(demo_built):
    sub = open_dataset(demo_built).select("train", shots=5, seed=1)  # 30 samples: 3 global batches of 8, 6 dropped
    one = train_batches(sub, batch_size=8)
    r0 = train_batches(sub, batch_size=4, rank=0, world_size=2, num_workers=2)
    r1 = train_batches(sub, batch_size=4, rank=1, world_size=2, num_workers=1)
    assert len(one) == len(r0) == len(r1) == 30 // 8
    for (x, y), (xa, ya), (xb, yb) in zip(one, r0, r1):
        assert torch.equal(x, torch.cat([xa, xb])) and torch.equal(y, torch.cat([ya, yb]))


def test_epoch_order_and_augmentation_follow_seed_epoch_key(demo_built):
    sub = open_dataset(demo_built).select("train", shots=2, seed=1)
    for epoch in (0, 1):
        batches = train_batches(sub, epoch=epoch, seed=7)
        perm = list(range(len(sub)))
        random.Random(f"7:{epoch}").shuffle(perm)
        for t, (x, y) in enumerate(batches):
            for j, i in enumerate(perm[t * 4:(t + 1) * 4]):
                ref = normalise(train_array(stored_bytes(sub, i), 32, sample_seed(7, epoch, sub.keys[i])))
                assert torch.equal(x[j], ref) and y[j] == sub.labels[i]
    e0, e1 = train_batches(sub, epoch=0), train_batches(sub, epoch=1)
    assert not torch.equal(torch.cat([b[0] for b in e0]), torch.cat([b[0] for b in e1]))


def test_augmentation_crops_within_torchvision_bounds():
    import random as pyrandom

    from data_shards.images import crop_box

    boxes = [crop_box(60, 40, pyrandom.Random(s)) for s in range(300)]
    assert all(0 <= b[0] < b[2] <= 60 and 0 <= b[1] < b[3] <= 40 for b in boxes)
    areas = [((b[2] - b[0]) * (b[3] - b[1])) / 2400 for b in boxes]
    assert min(areas) < 0.2 and max(areas) > 0.8  # scale (0.08, 1) is explored
    ratios = [(b[2] - b[0]) / (b[3] - b[1]) for b in boxes]
    assert all(3 / 4 * 0.8 <= r <= 4 / 3 * 1.2 for r in ratios)
    assert len(set(boxes)) > 250
    # torchvision's fallback when no try fits: the largest centred crop within the ratio bounds.
    assert crop_box(100, 10, pyrandom.Random(0), scale=(2.0, 2.0)) == (43, 0, 56, 10)


def test_fewshot_training_reads_only_its_shards(demo_built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(demo_built, out)
    ds = open_dataset(out)
    sub = ds.select("train", shots=1, seed=3)
    all_train = set(ds.info["splits"]["train"]["shards"])
    unused = all_train - set(sub.shard_files)
    assert len(sub.shard_files) <= 6 and unused
    before = train_batches(sub, batch_size=2)
    for name in unused:  # same size, other bytes: a reader that touched them would fail its checksums
        p = out / name
        p.write_bytes(b"\0" * p.stat().st_size)
    after = train_batches(open_dataset(out).select("train", shots=1, seed=3), batch_size=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before, after))
    used = out / sub.shard_files[0]
    used.write_bytes(b"\0" * used.stat().st_size)
    with pytest.raises(DataError, match="checksum"):
        train_batches(open_dataset(out).select("train", shots=1, seed=3), batch_size=2)


def test_bad_loader_arguments(demo_built):
    sub = open_dataset(demo_built).select("test")
    with pytest.raises(DataError, match="rank=2"):
        make_loader(sub, train=False, batch_size=4, image_size=32, mean=MEAN, std=STD, rank=2, world_size=2)
