"""What the benchmarks share: timing a step after warm-up (with the GPU's peak memory), and appending a JSON line
so that a run killed by its time limit keeps every record it wrote whole.

torch is imported only inside `timed`: tests/gpu's results plugin appends lines with no torch import of its own."""

from __future__ import annotations

import json
import os
import time


def timed(fn, warmup: int, steps: int, device) -> dict:
    """ms per step over `steps` steps after `warmup`, peak GPU MiB (0 on CPU), the first step's value (what `fn`
    returned: a loss) and its wall seconds (a compiled row's compile time)."""
    import torch

    t0 = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1000 / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {"ms_per_step": ms, "peak_mib": peak, "first_loss": first, "first_step_s": first_s}


def append_jsonl(path: str | os.PathLike | None, rec: dict) -> None:
    """One write() per record on an O_APPEND descriptor: a kill leaves whole lines (at worst a torn last one, which
    readers skip), never a second file. No path: nothing written."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)
