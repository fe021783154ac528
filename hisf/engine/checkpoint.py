"""Trial checkpoints (trainable weights, optimiser, scaler, schedule, RNG, data position), written atomically, and prompt export."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hisf.config import ConfigError, TrialConfig
from hisf.safe_load import safe_load

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
PROMPTS_FILE = "prompts.pt"
FORMAT_VERSION = 1

# Keys that may change between a killed run and its restart without changing what is computed.
_RUNTIME_KEYS = ("output_dir", "device", "data.num_workers", "data.root", "train.log_every", "train.eval_batch_size",
                 "train.compile", "train.compile_mode", "train.deterministic", "backbone.cache_dir")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(cuda_states: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Host RNG states plus `cuda`: one CUDA generator state per rank, each for that rank's own device
    (gather_cuda_rng_states collects them on every rank; absent on a CPU trial)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: weights_only loading accepts tensors, not ndarrays.
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if cuda_states:
        state["cuda"] = [t.cpu() for t in cuda_states]
    return state


def cuda_state_for_rank(saved: Any, rank: int) -> torch.Tensor | None:
    """This rank's CUDA generator state from a checkpoint's `cuda` list, tolerating another world size.

    A retry may see fewer or more ranks/GPUs than the attempt that saved (Ray Train placing 3+1 instead of
    4, a single-GPU retry, another node): a rank the checkpoint has no state for takes rank 0's, which is
    what every rank held after seeding; no state (a CPU-written checkpoint) leaves the generator as seeded.
    """
    if isinstance(saved, torch.Tensor):
        return saved
    if not saved:
        return None
    return saved[rank] if rank < len(saved) else saved[0]


def set_rng_state(state: Mapping[str, Any], rank: int = 0, device: torch.device | None = None) -> None:
    """Restore the host generators and, on a CUDA `device`, that device's generator from this rank's state."""
    random.setstate(_as_python_rng(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = cuda_state_for_rank(state.get("cuda"), rank)
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _as_python_rng(s: Any) -> tuple:
    # torch.load(weights_only=True) gives lists back for python's (version, tuple, gauss) state.
    return (s[0], tuple(s[1]), s[2])


def identity(cfg: TrialConfig) -> dict[str, Any]:
    """The part of a trial config a checkpoint must agree with to be resumed (runtime-only keys dropped)."""
    flat = cfg.flatten()
    return {k: v for k, v in flat.items() if k not in _RUNTIME_KEYS}


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / STATE_FILE


def save_checkpoint(output_dir: str | Path, state: Mapping[str, Any]) -> Path:
    path = checkpoint_path(output_dir)
    # A writer killed mid-save leaves its temp file behind (never the checkpoint itself); only rank 0 writes.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_save({"version": FORMAT_VERSION, **state}, path)
    return path.parent


def load_checkpoint(output_dir: str | Path, cfg: TrialConfig, classnames: tuple[str, ...]) -> dict[str, Any] | None:
    """The latest checkpoint of this trial, or None; an incompatible one is an error, never silently reused."""
    path = checkpoint_path(output_dir)
    if not path.is_file():
        return None
    state = safe_load(path, "trial checkpoint", ConfigError)
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: checkpoint format {got!r}, expected {FORMAT_VERSION}")
    saved, now = state["identity"], identity(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{path}: checkpoint was written by a different trial config: {k} is {saved.get(k)!r} there, "
            f"{now.get(k)!r} now; use a fresh output_dir or resume=False"
        )
    if tuple(state["classnames"]) != tuple(classnames):
        raise ConfigError(
            f"{path}: checkpoint's class set ({len(state['classnames'])} classes, first "
            f"{list(state['classnames'][:3])}) does not match the dataset's training classes "
            f"({len(classnames)}, first {list(classnames[:3])})"
        )
    return state


def export_prompts(path: str | Path, trainable: Mapping[str, torch.Tensor], cfg: TrialConfig, classnames: tuple[str, ...]) -> Path:
    """Write the trained prompt-side weights alone (a few MB) with what is needed to rebuild the model."""
    payload = {
        "version": FORMAT_VERSION,
        "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
        "method": cfg.to_dict()["method"],
        "backbone": cfg.to_dict()["backbone"],
        "dataset": cfg.data.dataset,
        "classnames": list(classnames),
    }
    atomic_save(payload, path)
    return Path(path)


def _without_cache(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "cache_dir"}


def load_prompts(path: str | Path, model: Any, cfg: TrialConfig | None = None) -> dict[str, Any]:
    """Load exported prompts into a PromptModel built with the same method/backbone; returns the payload."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported prompts file not found")
    payload = safe_load(path, "prompts file", ConfigError)
    if cfg is not None:
        for section in ("method", "backbone"):
            # Where the backbone's weights are cached is not which weights they are.
            if _without_cache(payload[section]) != _without_cache(cfg.to_dict()[section]):
                raise ConfigError(f"{path}: prompts were trained with a different {section} config "
                                  f"({payload[section]}) than {cfg.to_dict()[section]}")
    model.load_trainable_state_dict(payload["trainable"])
    return payload
