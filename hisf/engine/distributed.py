"""The process group of one trial: read from the environment (torchrun or Ray Train), gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # True when this process created the group (and so must destroy it); Ray Train owns its own group.
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` -> `cuda:LOCAL_RANK` when CUDA is present, else `cpu`; explicit names are checked."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    elif dev.type != "cpu":
        raise ValueError(f"device: unsupported device type {dev.type!r}; expected cpu or cuda")
    return dev


def init_from_env(device: str = "auto") -> DistEnv:
    """Join (or create) the process group described by torchrun/Ray Train's RANK/WORLD_SIZE variables.

    A process group already initialised by the caller (Ray Train's TorchTrainer) is used as is; one
    created here uses the env:// rendezvous torchrun sets up (MASTER_ADDR/MASTER_PORT).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Ray Train sets each worker's current CUDA device itself (its GPU ids need not equal LOCAL_RANK).
        index = torch.cuda.current_device() if torch.cuda.is_available() else local_rank
        return DistEnv(rank, world, local_rank, resolve_device(device, index), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, owns_group=False)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set; launch with torchrun or Ray Train")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, dev, owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one rank) and return it."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Average the trainable gradients over ranks in one flat buffer (the backbone has no grads to sync).

    This is what DDP would do for the prompt module alone; doing it by hand keeps the frozen backbone out
    of any gradient bucket and makes every rank see the same (possibly non-finite) gradients, so every
    rank takes the same skip-or-step decision.
    """
    # A parameter without a gradient stays without one (as on one rank, where SGD then skips it); every rank
    # runs the same graph, so all ranks agree on which those are.
    params = [p for p in params if p.grad is not None]
    if not env.distributed or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_params(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Make every rank start from rank 0's trainable values (what DDP does at wrap time)."""
    if not env.distributed:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True when `flag` is true on at least one rank (a callback's StopTrial on rank 0 stops all ranks)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()
