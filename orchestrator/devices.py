"""Where a trial's process trains on a Ray node: the GPU Ray assigned it (or the CPU), and its share of that GPU.

Ray 2.60 no longer hides GPUs from a task given none, and the engine's `device: auto` would pick cuda:0:
every concurrent trial and DDP rank would stack on GPU 0, unaccounted. So the device follows the spec's
resources, never what the process happens to see: `gpus_per_trial: 0` trains on the CPU; otherwise on
the GPU in `ray.get_gpu_ids()`, addressed by its position in CUDA_VISIBLE_DEVICES, made the process's
current device. A fractional GPU (0.5: two trials per card) caps the process's CUDA caching allocator at
that share of the card's memory less what the process holds outside the allocator (`allocator_cap`), so
co-located trials cannot OOM each other at random.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

from hisf.config import ConfigError

log = logging.getLogger("hisf.orchestrator")


def trial_device(gpus: float, gpu_ids: Sequence, visible: str | None, configured: str = "auto") -> str:
    """The `device` a trial process trains on (pure): `cpu` without GPUs, else `cuda:K` for Ray's GPU.

    `gpus` is the spec's gpus_per_trial (per worker), `gpu_ids` what ray.get_gpu_ids() returned in this
    process, `visible` its CUDA_VISIBLE_DEVICES (Ray sets it to the assigned ids, so K is usually 0);
    a `configured` device of `cpu` keeps the trial on the CPU.
    """
    if gpus <= 0 or configured == "cpu":
        return "cpu"
    if not gpu_ids:
        raise RuntimeError(f"resources.gpus_per_trial is {gpus:g} but Ray assigned this trial no GPU "
                           f"(ray.get_gpu_ids() is empty, CUDA_VISIBLE_DEVICES={visible!r})")
    gpu = str(gpu_ids[0])
    listed = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if listed and listed != ["NoDevFiles"]:
        if gpu not in listed:
            raise RuntimeError(f"Ray assigned GPU {gpu} but CUDA_VISIBLE_DEVICES={visible!r} does not list it")
        return f"cuda:{listed.index(gpu)}"
    if not gpu.isdigit():
        raise RuntimeError(f"Ray assigned GPU {gpu!r}, which is no CUDA ordinal, and CUDA_VISIBLE_DEVICES is unset")
    return f"cuda:{int(gpu)}"


def memory_fraction(gpus: float) -> float | None:
    """The share of its GPU's memory a trial may use: its fraction of the card, or None for a whole one."""
    return float(gpus) if 0 < gpus < 1 else None


MiB = 2**20
# Device memory a trial's process holds outside PyTorch's caching allocator, which is all that
# torch.cuda.set_per_process_memory_fraction limits:
# - the CUDA context with the kernels it loads lazily (CUDA 12 on Hopper: ~500-600 MiB in nvidia-smi for a
#   PyTorch process that has allocated nothing once its first kernels ran);
CUDA_CONTEXT_MIB = 640
# - cuBLAS/cuBLASLt and cuDNN handles with their workspaces (32 MiB per handle and stream at :4096:8, the
#   setting hisf-bench's workers get; PyTorch draws the cuBLAS workspace from its allocator in recent
#   versions, so this errs on the safe side);
CUBLAS_MIB = 128
# - a DDP worker's NCCL communicator: NCCL_BUFFSIZE (4 MiB) per channel and peer over up to 32 channels,
#   plus NCCL's own device structures.
NCCL_MIB = 512
# Below this left for tensors a trial of ours cannot even hold ViT-B/16 in half precision.
MIN_ALLOCATOR_MIB = 512


def allocator_cap(share: float, total_bytes: int, workers: int = 1) -> tuple[float, int]:
    """(fraction of the card for the caching allocator, MiB reserved outside it) so that the process's whole
    footprint stays within `share` of a card of `total_bytes`; `workers` > 1 reserves NCCL's buffers too.
    A share too small to train in is a ConfigError: the trial fails once, not on every retry."""
    reserved = CUDA_CONTEXT_MIB + CUBLAS_MIB + (NCCL_MIB if workers > 1 else 0)
    left = share * total_bytes - reserved * MiB
    if left < MIN_ALLOCATOR_MIB * MiB:
        raise ConfigError(f"resources.gpus_per_trial {share:g} of a {total_bytes / 2**30:.1f} GiB GPU leaves "
                           f"{left / MiB:.0f} MiB for tensors once {reserved} MiB are kept for the CUDA context, cuBLAS"
                           f"{' and NCCL' if workers > 1 else ''} (outside PyTorch's allocator); give each trial a "
                           f"larger share of the GPU")
    return left / total_bytes, reserved


def place_trial(cfg, gpus: float):
    """`cfg` with the device this Ray worker must use; caps the CUDA allocator at a fractional GPU's share.

    An assigned GPU that torch cannot use (driver too old for the wheel, broken device mount) fails the
    trial here with the reason, instead of turning it into a slow CPU trial that holds the GPU reserved.
    A DDP worker (its process group already made by Ray Train) also reserves room for NCCL's buffers.
    """
    import ray
    import torch
    import torch.distributed as dist

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ray.get_gpu_ids() if gpus > 0 else []
    device = trial_device(gpus, ids, visible, cfg.device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"Ray assigned GPU(s) {list(ids)} (CUDA_VISIBLE_DEVICES={visible!r}) but torch "
                               f"{torch.__version__} built for CUDA {torch.version.cuda} cannot use them (driver too "
                               f"old, or no device files); fix the node or run with gpus_per_trial: 0")
        dev = torch.device(device)
        torch.cuda.set_device(dev)  # the process's current device: no context on another GPU (the engine sets it too)
        share = memory_fraction(gpus)
        if share is not None:
            total = torch.cuda.get_device_properties(dev).total_memory
            workers = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            cap, reserved = allocator_cap(share, total, workers)
            torch.cuda.set_per_process_memory_fraction(cap, dev)
            log.info("trial on %s: caching allocator capped at %.1f%% of its %.1f GiB (gpus_per_trial %g less %d MiB "
                     "for the CUDA context, cuBLAS%s outside the allocator)", device, 100 * cap, total / 2**30, gpus,
                     reserved, " and NCCL" if workers > 1 else "")
    return dataclasses.replace(cfg, device=device)
