"""Where a trial's process trains on a Ray node: the GPU Ray assigned it (or the CPU), and its share of that GPU.

Ray 2.60 no longer hides GPUs from a task given none, and the engine's `device: auto` would pick cuda:0:
every concurrent trial and DDP rank would stack on GPU 0, unaccounted. So the device follows the spec's
resources, never what the process happens to see: `gpus_per_trial: 0` trains on the CPU; otherwise on
the GPU in `ray.get_gpu_ids()`, addressed by its position in CUDA_VISIBLE_DEVICES. A fractional GPU
(0.5: two trials per card) caps the process's CUDA allocator at that share of the card's memory, so
co-located trials cannot OOM each other at random.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

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
    """The share of its GPU's memory a trial may allocate: its fraction of the card, or None for a whole one."""
    return float(gpus) if 0 < gpus < 1 else None


def place_trial(cfg, gpus: float):
    """`cfg` with the device this Ray worker must use; caps the CUDA allocator at a fractional GPU's share.

    An assigned GPU that torch cannot use (driver too old for the wheel, broken device mount) fails the
    trial here with the reason, instead of turning it into a slow CPU trial that holds the GPU reserved.
    """
    import ray
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ray.get_gpu_ids() if gpus > 0 else []
    device = trial_device(gpus, ids, visible, cfg.device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"Ray assigned GPU(s) {list(ids)} (CUDA_VISIBLE_DEVICES={visible!r}) but torch "
                               f"{torch.__version__} built for CUDA {torch.version.cuda} cannot use them (driver too "
                               f"old, or no device files); fix the node or run with gpus_per_trial: 0")
        share = memory_fraction(gpus)
        if share is not None:
            torch.cuda.set_per_process_memory_fraction(share, torch.device(device))
            log.info("trial on %s capped at %.0f%% of its memory (gpus_per_trial %g)", device, 100 * share, gpus)
    return dataclasses.replace(cfg, device=device)
