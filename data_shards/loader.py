"""Loaders over a Subset: seeded random-access training batches and streamed evaluation, split across ranks and workers."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.dataset import Subset
from data_shards.errors import DataError
from data_shards.images import sample_seed, test_view, train_view


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _to_batch(arrays: list[np.ndarray], labels: list[int], mean: torch.Tensor, std: torch.Tensor):
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    return x, torch.as_tensor(labels, dtype=torch.int64)


def _check_bytes(data: bytes, checksum: str, shard: str, key: str) -> None:
    if hashlib.sha1(data).hexdigest() != checksum:
        raise DataError(f"{shard}: sample {key} does not match the manifest checksum (shard rewritten or corrupt)")


class TrainBatches(IterableDataset):
    """Global batch t = perm[t*B*W:(t+1)*B*W] of a (seed, epoch) permutation; rank r takes its [r*B:(r+1)*B]
    slice; loader worker w makes batches t = w, w+n, ... (the DataLoader returns them in t order). Only the
    shards holding the subset's samples are read, each sample by its byte range."""

    def __init__(self, sub: Subset, batch_size: int, image_size: int, mean, std, seed: int, epoch: int, rank: int, world_size: int):
        self.sub, self.B, self.S, self.seed, self.epoch = sub, batch_size, image_size, seed, epoch
        self.rank, self.W = rank, world_size
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.perm = np.random.default_rng([seed, epoch]).permutation(len(sub))
        self.n_batches = len(sub) // (batch_size * world_size)

    def __len__(self) -> int:
        return self.n_batches

    def indices(self, t: int) -> np.ndarray:
        start = t * self.B * self.W + self.rank * self.B
        return self.perm[start:start + self.B]

    def __iter__(self):
        wid, nw = _worker()
        files: dict[str, object] = {}
        root = Path(self.sub.root)
        try:
            for t in range(wid, self.n_batches, nw):
                arrays, labels = [], []
                for i in self.indices(t):
                    shard = self.sub.shards[i]
                    f = files.get(shard) or files.setdefault(shard, open(root / shard, "rb"))
                    f.seek(int(self.sub.offsets[i]))
                    data = f.read(int(self.sub.sizes[i]))
                    _check_bytes(data, self.sub.checksums[i], str(root / shard), self.sub.keys[i])
                    arrays.append(train_view(data, self.S, sample_seed(self.seed, self.epoch, self.sub.keys[i])))
                    labels.append(int(self.sub.labels[i]))
                yield _to_batch(arrays, labels, self.mean, self.std)
        finally:
            for f in files.values():
                f.close()


def eval_ranges(n: int, rank: int, world_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of the subset, one per loader worker of this rank: every sample in
    exactly one range across all ranks and workers, rank sizes differing by at most one sample."""
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    m, k = hi - lo, max(1, num_workers)
    return [(lo + m * w // k, lo + m * (w + 1) // k) for w in range(k)]


class EvalBatches(IterableDataset):
    """Streams the shards holding this worker's range with WebDataset, keeping only the range's samples."""

    def __init__(self, sub: Subset, batch_size: int, image_size: int, mean, std, rank: int, world_size: int, num_workers: int):
        self.sub, self.B, self.S = sub, batch_size, image_size
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.ranges = eval_ranges(len(sub), rank, world_size, num_workers)

    def __len__(self) -> int:
        return sum(math.ceil((b - a) / self.B) for a, b in self.ranges)

    def __iter__(self):
        import webdataset as wds

        wid, nw = _worker()
        if nw != len(self.ranges):
            raise RuntimeError(f"EvalBatches planned for {len(self.ranges)} workers, running in {nw}")
        a, b = self.ranges[wid]
        if a == b:
            return
        wanted = {self.sub.keys[i]: i for i in range(a, b)}
        root = Path(self.sub.root)
        # Shards in manifest order so the stream meets samples in the order they were written.
        urls = sorted({self.sub.shards[i] for i in range(a, b)})
        stream = wds.WebDataset([str(root / u) for u in urls], shardshuffle=False, nodesplitter=None,
                                workersplitter=None, empty_check=False)
        arrays, labels, seen = [], [], 0
        for sample in stream:
            i = wanted.get(sample["__key__"])
            if i is None:
                continue
            data = sample.get("jpg")
            if data is None:
                raise DataError(f"{sample.get('__url__')}: sample {sample['__key__']} has no jpg member")
            _check_bytes(data, self.sub.checksums[i], str(sample.get("__url__")), sample["__key__"])
            arrays.append(test_view(data, self.S))
            labels.append(int(self.sub.labels[i]))
            seen += 1
            if len(arrays) == self.B:
                yield _to_batch(arrays, labels, self.mean, self.std)
                arrays, labels = [], []
        if arrays:
            yield _to_batch(arrays, labels, self.mean, self.std)
        if seen != b - a:
            raise DataError(f"{root}: shards {urls} hold {seen} of the {b - a} samples the manifest lists for them")


def make_loader(subset: Subset, train: bool, batch_size: int, image_size: int, mean: Sequence[float],
                std: Sequence[float], seed: int = 1, epoch: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 0) -> DataLoader:
    """A DataLoader of (images [B,3,S,S] float normalised, labels int64) batches; see docs/interfaces.md."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError(f"make_loader: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                        f"num_workers={num_workers}; expected batch_size >= 1, 0 <= rank < world_size, num_workers >= 0")
    if len(mean) != 3 or len(std) != 3:
        raise DataError(f"make_loader: mean/std need 3 channel values, got {mean}, {std}")
    if train:
        ds = TrainBatches(subset, batch_size, image_size, mean, std, seed, epoch, rank, world_size)
    else:
        ds = EvalBatches(subset, batch_size, image_size, mean, std, rank, world_size, num_workers)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False)
