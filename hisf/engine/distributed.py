"""The process group of one trial: read from the environment (torchrun or Ray Train), gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import os
import warnings
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


def cuda_count() -> int:
    """CUDA devices this process can use: 0 when torch cannot initialise CUDA (device_count alone may still
    count the cards through NVML when the driver is too old for the wheel)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(device: str, *, cuda_devices: int, local_rank: int = 0, world_size: int = 1,
                current: int | None = None) -> torch.device:
    """The trial's device from the `device` setting and what this process sees; pure (no CUDA call).

    `cuda_devices` is cuda_count(); `current` is the CUDA device a launcher already made current (Ray Train
    does per worker). One process: `auto` -> cuda:0 (or `current`) when CUDA is usable, else cpu; `cuda:N`
    is checked against the visible count. Several ranks: the index comes from the launcher's current device,
    else cuda:0 when each process sees one GPU, else cuda:LOCAL_RANK; an explicit index is then ignored
    (every rank on one GPU would make NCCL fail on the duplicate).
    """
    if device == "auto":
        kind, index = ("cuda" if cuda_devices else "cpu"), None
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device: unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device: unsupported device type {dev.type!r}; expected cpu or cuda")
        kind, index = dev.type, dev.index
    if kind == "cpu":
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    if cuda_devices < 1:
        raise ValueError(f"device: {device!r} asked for but CUDA is not available in this process ({seen}, torch "
                         f"{torch.__version__} built for CUDA {torch.version.cuda}): no usable GPU, or a driver too "
                         f"old for this torch")
    if world_size > 1:
        if current is not None:
            chosen = current
        elif cuda_devices == 1:
            chosen = 0
        elif local_rank < cuda_devices:
            chosen = local_rank
        else:
            raise ValueError(f"device: local rank {local_rank} of {world_size} ranks but this process sees only "
                             f"{cuda_devices} CUDA device(s) ({seen}); give each rank a GPU")
        if index is not None and index != chosen:
            warnings.warn(f"device: {device!r} ignored for rank {local_rank} of a {world_size}-rank group; "
                          f"using cuda:{chosen} (each rank needs its own GPU)", stacklevel=2)
        return torch.device(f"cuda:{chosen}")
    chosen = index if index is not None else (current if current is not None else 0)
    if not 0 <= chosen < cuda_devices:
        raise ValueError(f"device: {device!r} but this process sees {cuda_devices} CUDA device(s) ({seen}); "
                         f"expected cuda:0..cuda:{cuda_devices - 1}")
    return torch.device(f"cuda:{chosen}")


def resolve_device(device: str, local_rank: int = 0, world_size: int = 1, current: int | None = None) -> torch.device:
    """pick_device with this process's CUDA count."""
    return pick_device(device, cuda_devices=cuda_count(), local_rank=local_rank, world_size=world_size, current=current)


def check_device(dev: torch.device) -> str:
    """Touch the device once and return its description (`cuda:0 (NVIDIA H100 80GB HBM3)`); a GPU that is
    visible but unusable (broken mount, driver mismatch) fails here with its reason, before any work."""
    if dev.type != "cuda":
        return str(dev)
    try:
        torch.empty(1, device=dev).add_(1)
        name = torch.cuda.get_device_name(dev)
    except Exception as e:  # noqa: BLE001 - whatever CUDA raises, the trial cannot use this GPU
        raise RuntimeError(f"device {dev}: assigned but unusable by torch {torch.__version__} (CUDA "
                           f"{torch.version.cuda}): {type(e).__name__}: {e}") from e
    return f"{dev} ({name})"


def use_device(dev: torch.device) -> torch.device:
    """Make a CUDA `dev` this process's current device (a no-op for the CPU) and return it.

    Without it a process given `cuda:1` still has cuda:0 current: the DataLoader's pin-memory thread, cuBLAS
    handles and any `torch.device("cuda")` tensor would open a context on GPU 0 beside the trial's own.
    """
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_from_env(device: str = "auto") -> DistEnv:
    """Join (or create) the process group described by torchrun/Ray Train's RANK/WORLD_SIZE variables.

    A process group already initialised by the caller (Ray Train's TorchTrainer) is used as is; one
    created here uses the env:// rendezvous torchrun sets up (MASTER_ADDR/MASTER_PORT).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # A gloo group (Ray Train without GPUs) is a CPU group, even on a node whose GPUs are visible.
        if device == "auto" and dist.get_backend() == "gloo":
            device = "cpu"
        # Ray Train sets each worker's current CUDA device itself (its GPU ids need not equal LOCAL_RANK).
        current = torch.cuda.current_device() if cuda_count() and dist.get_backend() == "nccl" else None
        dev = use_device(resolve_device(device, local_rank, world, current))
        return DistEnv(rank, world, local_rank, dev, owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = use_device(resolve_device(device, local_rank, world))
    if world <= 1:
        return DistEnv(0, 1, 0, dev, owns_group=False)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set; launch with torchrun or Ray Train")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, dev, owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def gather_cuda_rng_states(env: DistEnv) -> list[torch.Tensor] | None:
    """Every rank's own CUDA generator state, by rank (a collective: call on every rank); None on the CPU."""
    if env.device.type != "cuda":
        return None
    own = torch.cuda.get_rng_state(env.device)
    if not env.distributed:
        return [own]
    states: list = [None] * env.world_size
    dist.all_gather_object(states, own)
    return states


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


def any_rank_each(flags: list[bool], env: DistEnv) -> list[bool]:
    """Per position, True when that flag is true on at least one rank (one collective for a group's members)."""
    if not env.distributed or not flags:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()
