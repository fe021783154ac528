"""The loaders inside a real gloo process group: 2 ranks x 2 loader workers each, as the engine runs them."""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_shards import make_loader, open_dataset
from tests.data_shards.layouts import MEAN, STD
from tests.support import free_port


def _rank_main(rank: int, world: int, port: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = open_dataset(path)
        test = ds.select("test", classes="base")
        loader = make_loader(test, train=False, batch_size=4, image_size=32, mean=MEAN, std=STD,
                             rank=dist.get_rank(), world_size=dist.get_world_size(), num_workers=2)
        digests = [hashlib.sha1(x.numpy().tobytes()).hexdigest() for xb, _ in loader for x in xb]
        correct = torch.tensor([float(sum(int(y.sum()) for _, y in loader)), float(len(digests))])
        dist.all_reduce(correct)  # what the engine does with per-rank sums
        train = ds.select("train", shots=4, seed=1)
        tl = make_loader(train, train=True, batch_size=4, image_size=32, mean=MEAN, std=STD, seed=1,
                         rank=dist.get_rank(), world_size=dist.get_world_size(), num_workers=2)
        n_train = torch.tensor([len(list(tl)), len(tl)])
        gathered = [None] * world
        dist.all_gather_object(gathered, {"digests": digests, "n_train": n_train.tolist(), "sums": correct.tolist()})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()



def test_two_gloo_ranks_with_two_workers_each(demo_built, tmp_path):
    out = tmp_path / "ranks.json"
    # fork: the ranks start in milliseconds instead of re-importing torch (this CPU machine is small)
    mp.start_processes(_rank_main, args=(2, free_port(), str(demo_built), str(out)), nprocs=2, join=True,
                       start_method="fork")
    ranks = json.loads(out.read_text())
    test = open_dataset(demo_built).select("test", classes="base")
    all_digests = ranks[0]["digests"] + ranks[1]["digests"]
    assert len(all_digests) == len(set(all_digests)) == len(test) == 21
    assert ranks[0]["sums"] == ranks[1]["sums"] == [float(test.labels.sum()), 21.0]
    # Training: 24 few-shot samples, global batch 2 x 4 -> 3 batches on each rank.
    assert ranks[0]["n_train"] == ranks[1]["n_train"] == [3, 3]
