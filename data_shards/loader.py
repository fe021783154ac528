"""Loaders over a Subset: seeded random-access training batches and streamed evaluation, split across ranks and workers."""

from __future__ import annotations

import hashlib
import math
import random
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.dataset import Subset
from data_shards.errors import DataError
from data_shards.images import sample_seed, eval_array, train_array


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def normalising_table(mean, std) -> np.ndarray:
    """[3, 256] float32: (v / 255 - mean[c]) / std[c] for every byte value v, computed in float32 exactly as
    ToTensor + Normalize would; one gather per pixel is several times cheaper than converting whole batches."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    return ((torch.arange(256, dtype=torch.float32) / 255.0).view(1, 256) - m).div(s).numpy()


def _to_batch(arrays: list[np.ndarray], labels: list[int], table: np.ndarray):
    h, w, _ = arrays[0].shape
    out = np.empty((len(arrays), 3, h, w), dtype=np.float32)
    for i, a in enumerate(arrays):
        for c in range(3):
            np.take(table[c], a[:, :, c], out=out[i, c])
    return torch.from_numpy(out), torch.as_tensor(labels, dtype=torch.int64)


def _check_bytes(data: bytes, checksum: str, shard: str, key: str) -> None:
    if hashlib.sha1(data).hexdigest() != checksum:
        raise DataError(f"{shard}: sample {key} does not match the manifest checksum (shard rewritten or corrupt)")


def read_by_range(sub: Subset, indices):
    """(index, stored bytes) for each subset index, read from its shard by offset and checked against the
    manifest: only the needed bytes of only the needed shards."""
    root = Path(sub.root)
    files: dict[str, object] = {}
    try:
        for i in indices:
            i = int(i)
            shard = sub.shards[i]
            f = files.get(shard) or files.setdefault(shard, open(root / shard, "rb"))
            f.seek(int(sub.offsets[i]))
            data = f.read(int(sub.sizes[i]))
            _check_bytes(data, sub.checksums[i], str(root / shard), sub.keys[i])
            yield i, data
    finally:
        for f in files.values():
            f.close()


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order: Python's string-seeded Mersenne Twister, stable across machines and versions."""
    perm = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(perm)
    return np.asarray(perm, dtype=np.int64)


class TrainBatches(IterableDataset):
    """Global batch t = perm[t*B*W:(t+1)*B*W] of a (seed, epoch) permutation; rank r takes its [r*B:(r+1)*B]
    slice; loader worker w makes batches t = w, w+n, ... (the DataLoader returns them in t order). Only the
    shards holding the subset's samples are read, each sample by its byte range."""

    def __init__(self, sub: Subset, batch_size: int, image_size: int, mean, std, seed: int, epoch: int, rank: int, world_size: int):
        self.sub, self.B, self.S, self.seed, self.epoch = sub, batch_size, image_size, seed, epoch
        self.rank, self.W = rank, world_size
        self.table = normalising_table(mean, std)
        self.perm = epoch_permutation(len(sub), seed, epoch)
        self.n_batches = len(sub) // (batch_size * world_size)

    def __len__(self) -> int:
        return self.n_batches

    def indices(self, t: int) -> np.ndarray:
        start = t * self.B * self.W + self.rank * self.B
        return self.perm[start:start + self.B]

    def __iter__(self):
        wid, nw = _worker()
        for t in range(wid, self.n_batches, nw):
            arrays, labels = [], []
            for i, data in read_by_range(self.sub, self.indices(t)):
                arrays.append(train_array(data, self.S, sample_seed(self.seed, self.epoch, self.sub.keys[i])))
                labels.append(int(self.sub.labels[i]))
            yield _to_batch(arrays, labels, self.table)


def eval_ranges(n: int, rank: int, world_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of the subset, one per loader worker of this rank: every sample in
    exactly one range across all ranks and workers, rank sizes differing by at most one sample."""
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    m, k = hi - lo, max(1, num_workers)
    return [(lo + m * w // k, lo + m * (w + 1) // k) for w in range(k)]


class EvalBatches(IterableDataset):
    """Each worker's contiguous range of the subset, streamed with WebDataset from the shards holding it
    (samples outside the range skipped undecoded), or read by byte range when the range is a sparse
    selection (a few-shot validation set) that would otherwise stream mostly unused bytes."""

    def __init__(self, sub: Subset, batch_size: int, image_size: int, mean, std, rank: int, world_size: int, num_workers: int):
        self.sub, self.B, self.S = sub, batch_size, image_size
        self.table = normalising_table(mean, std)
        self.ranges = eval_ranges(len(sub), rank, world_size, num_workers)

    def __len__(self) -> int:
        return sum(math.ceil((b - a) / self.B) for a, b in self.ranges)

    def _streamed(self, a: int, b: int):
        import webdataset as wds

        wanted = {self.sub.keys[i]: i for i in range(a, b)}
        root = Path(self.sub.root)
        # Shards in the order the range first meets them (manifest order for a whole split).
        urls = [str(root / u) for u in dict.fromkeys(self.sub.shards[i] for i in range(a, b))]
        stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        seen = 0
        try:
            for sample in stream:
                i = wanted.get(sample["__key__"])
                if i is None:
                    continue
                # The image member: `jpg` in fast builds, the original's own extension in exact ones.
                data = next((v for k, v in sample.items() if not k.startswith("__") and k != "cls"), None)
                if data is None:
                    raise DataError(f"{sample.get('__url__')}: sample {sample['__key__']} has no image member")
                _check_bytes(data, self.sub.checksums[i], str(sample.get("__url__")), sample["__key__"])
                seen += 1
                yield i, data
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"shards {urls}: unreadable while streaming ({type(e).__name__}: {e})") from None
        if seen != b - a:
            raise DataError(f"shards {urls} hold {seen} of the {b - a} samples the manifest lists for them")

    def _sparse(self, a: int, b: int) -> bool:
        root = Path(self.sub.root)
        # A sample's footprint in a tar: its image, the label member and two headers with padding.
        needed = int(self.sub.sizes[a:b].sum()) + 2048 * (b - a)
        streamed = sum((root / u).stat().st_size for u in set(self.sub.shards[a:b]))
        return needed < streamed // 4

    def __iter__(self):
        wid, nw = _worker()
        if nw != len(self.ranges):
            raise RuntimeError(f"EvalBatches planned for {len(self.ranges)} workers, running in {nw}")
        a, b = self.ranges[wid]
        if a == b:
            return
        samples = read_by_range(self.sub, range(a, b)) if self._sparse(a, b) else self._streamed(a, b)
        arrays, labels = [], []
        for i, data in samples:
            arrays.append(eval_array(data, self.S))
            labels.append(int(self.sub.labels[i]))
            if len(arrays) == self.B:
                yield _to_batch(arrays, labels, self.table)
                arrays, labels = [], []
        if arrays:
            yield _to_batch(arrays, labels, self.table)


def eval_images(images: Sequence[bytes], image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Encoded image files (any format PIL reads) as one batch [N, 3, S, S], by the evaluation loaders' own transform:
    the shorter side resized to S (bicubic), a centre crop of S, then CLIP's normalisation."""
    arrays = [eval_array(data, image_size) for data in images]
    return _to_batch(arrays, [0] * len(arrays), normalising_table(mean, std))[0]


def make_loader(subset: Subset, train: bool, batch_size: int, image_size: int, mean: Sequence[float],
                std: Sequence[float], seed: int = 1, epoch: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of (images [B,3,S,S] float normalised, labels int64) batches; see docs/interfaces.md.

    `pin_memory` (for a CUDA consumer) returns batches in page-locked memory, so that `.to(device,
    non_blocking=True)` copies asynchronously while the GPU still works on the previous step.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError(f"make_loader: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                        f"num_workers={num_workers}; expected batch_size >= 1, 0 <= rank < world_size, num_workers >= 0")
    if len(mean) != 3 or len(std) != 3:
        raise DataError(f"make_loader: mean/std need 3 channel values, got {mean}, {std}")
    if train:
        ds = TrainBatches(subset, batch_size, image_size, mean, std, seed, epoch, rank, world_size)
    else:
        ds = EvalBatches(subset, batch_size, image_size, mean, std, rank, world_size, num_workers)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory)
