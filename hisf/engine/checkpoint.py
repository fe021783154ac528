"""A trial's saved training state (`output_dir/checkpoint/state.pt`): the TrialState saved and restored whole, and
the identity a checkpoint must match to be resumed (the config, the global batch, the data it trained on).

The engine's one owner of resume: run_trial saves a TrialState after every epoch and, on a rerun, `resume`
restores it whole or refuses it with the reason; nothing else reads or writes the folder.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hisf.config import ConfigError, TrialConfig
from hisf.deletion import remove_tree
from hisf.engine.atomic import atomic_save
from hisf.safe_load import safe_load

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
# 2: the identity holds the global batch and the data fingerprints besides the config.
FORMAT_VERSION = 2

# Keys that may change between a killed run and its restart without changing what is computed.
_RUNTIME_KEYS = ("output_dir", "device", "data.num_workers", "data.root", "train.log_every", "train.eval_batch_size",
                 "train.compile", "train.compile_mode", "train.deterministic", "backbone.cache_dir")


class ResumeError(ConfigError):
    """The checkpoint in a trial's output_dir cannot be resumed: unreadable, or another run's; `path` names it."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


_COUNTERS = ("epoch", "history", "skipped_steps", "global_step", "train_seconds", "eval_seconds")


@dataclass
class TrialState:
    """One trial's training state: its trainable tensors with their optimiser, schedule and loss scaler, the data
    position (`epoch`, the next one to run) and the running totals. A checkpoint is this whole, and so is a resume.

    The trial is member `member` of its model (a fused group, docs/fusion.md; 0 for a trial alone): its trainable
    tensors are that slice of the model's stacked parameters, and its optimiser runs over views of those slices
    (`pairs`: stacked parameter and view, in the optimiser's order). The saved state has a solo trial's shapes.
    """

    model: Any  # the PromptModel whose trainable tensors these are
    optimizer: torch.optim.Optimizer | None = None  # None when nothing trains (epochs 0, zero-shot)
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    epoch: int = 0
    history: list[dict] = field(default_factory=list)  # each finished epoch's metrics
    skipped_steps: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    member: int = 0  # position on the model's member axis
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list, repr=False)

    def counters(self) -> dict[str, Any]:
        """Everything but the tensors' state: the data position and the running totals."""
        return {k: getattr(self, k) for k in _COUNTERS}

    def stacked(self) -> list[torch.nn.Parameter]:
        """The model's stacked trainable parameters this member's optimiser steps (a slice of each)."""
        return [p for p, _ in self.pairs]

    def bind_grads(self) -> None:
        """Point each view's .grad at this member's slice of its stacked parameter's gradient (None stays None:
        the optimiser then skips it, as it would a solo trial's parameter that got no gradient)."""
        for p, v in self.pairs:
            v.grad = None if p.grad is None else p.grad[self.member]

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainable": self.model.trainable_state_dict(self.member),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            **self.counters(),
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.model.load_trainable_state_dict(saved["trainable"], self.member)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        for k in self.counters():
            setattr(self, k, saved[k])


def identity(cfg: TrialConfig) -> dict[str, Any]:
    """The part of a trial config a checkpoint must agree with to be resumed (runtime-only keys dropped)."""
    flat = cfg.flatten()
    return {k: v for k, v in flat.items() if k not in _RUNTIME_KEYS}


@dataclass(frozen=True)
class ResumeIdentity:
    """What a checkpoint must agree with to be resumed: the config (`identity`), the global batch (ranks x the
    per-rank `train.batch_size`: it fixes every step's samples and the steps per epoch) and the data, by
    `BuiltDataset.fingerprint` of the source dataset and of every target the trial opened."""

    config: dict[str, Any]
    world_size: int
    batch_size: int
    data: dict[str, str]

    @classmethod
    def of(cls, cfg: TrialConfig, world_size: int, fingerprints: Mapping[str, str]) -> "ResumeIdentity":
        return cls(identity(cfg), world_size, cfg.train.batch_size, dict(fingerprints))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ResumeIdentity":
        return cls(dict(d["config"]), int(d["world_size"]), int(d["batch_size"]), dict(d["data"]))

    def differences(self, saved: "ResumeIdentity") -> list[str]:
        """What differs from `saved`, one phrase per key (`method.lambda_le is 1.0 there, 0.5 now`)."""
        out = [f"{k} is {saved.config.get(k)!r} there, {self.config.get(k)!r} now"
               for k in sorted(set(saved.config) | set(self.config)) if saved.config.get(k) != self.config.get(k)]
        if saved.world_size != self.world_size:
            out.append(f"the global batch is {saved.world_size * saved.batch_size} there ({saved.world_size} rank(s) "
                       f"x {saved.batch_size}), {self.world_size * self.batch_size} now ({self.world_size} rank(s) "
                       f"x {self.batch_size})")
        for key in sorted(set(saved.data) | set(self.data)):
            there, now = saved.data.get(key, "not opened"), self.data.get(key, "not opened")
            if there != now:
                out.append(f"dataset {key!r} is build {there} there, {now} now (rebuilt, or other images)")
        return out


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / STATE_FILE


def save_checkpoint(output_dir: str | Path, state: TrialState, ident: ResumeIdentity, classnames: tuple[str, ...],
                    cuda_rng: list[torch.Tensor] | None = None) -> Path:
    """Write `state` whole (plus RNG states and what resuming checks) atomically; returns the checkpoint folder."""
    path = checkpoint_path(output_dir)
    # A writer killed mid-save leaves its temp file behind (never the checkpoint itself); only rank 0 writes.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_save({"version": FORMAT_VERSION, "identity": ident.to_dict(), "classnames": list(classnames),
                 "rng": rng_state(cuda_rng), **state.state_dict()}, path)
    return path.parent


def load_checkpoint(output_dir: str | Path, ident: ResumeIdentity, classnames: tuple[str, ...]) -> dict[str, Any] | None:
    """This trial's latest checkpoint, or None; one that is unreadable or another run's raises ResumeError."""
    path = checkpoint_path(output_dir)
    if not path.is_file():
        return None
    state = safe_load(path, "trial checkpoint", lambda msg: ResumeError(msg, path))
    version = state.get("version") if isinstance(state, dict) else type(state).__name__
    if version != FORMAT_VERSION:
        raise ResumeError(f"{path}: checkpoint format {version!r}, expected {FORMAT_VERSION} (written by another "
                          "hisf-bench version): it cannot be resumed; a fresh start (resume=False) replaces it", path)
    differences = ident.differences(ResumeIdentity.from_dict(state["identity"]))
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise ResumeError(f"{path}: checkpoint belongs to another run: {'; '.join(differences[:3])}{more}. Resuming "
                          "it would mix two runs; use another output_dir, or start afresh (resume=False)", path)
    if tuple(state["classnames"]) != tuple(classnames):
        raise ResumeError(
            f"{path}: checkpoint's class set ({len(state['classnames'])} classes, first "
            f"{list(state['classnames'][:3])}) does not match the dataset's training classes "
            f"({len(classnames)}, first {list(classnames[:3])})", path)
    return state


def resume(output_dir: str | Path, state: TrialState, ident: ResumeIdentity, classnames: tuple[str, ...],
           rank: int = 0, device: torch.device | None = None) -> bool:
    """Restore `state` whole from the trial's checkpoint (and this rank's RNG states); False when there is none."""
    saved = load_checkpoint(output_dir, ident, classnames)
    if saved is None:
        return False
    state.load_state_dict(saved)
    set_rng_state(saved["rng"], rank, device)
    return True


def clear_checkpoint(output_dir: str | Path) -> Path | None:
    """Delete the trial's checkpoint folder (its saved training state, nothing else of output_dir); returns it,
    or None when there was none. Refuses a folder that is a link or resolves outside output_dir."""
    folder = checkpoint_path(output_dir).parent
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir() or folder.resolve().parent != Path(output_dir).resolve():
        raise ResumeError(f"{folder}: not a checkpoint folder of this trial (a link, a file, or outside "
                          f"{output_dir}); not deleted", folder)
    remove_tree(folder, output_dir, "checkpoint folder")
    return folder


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
    """This rank's CUDA generator state from a checkpoint's `cuda` list, tolerating another GPU count.

    A retry may see fewer or more GPUs than the attempt that saved (Ray Train placing 3+1 instead of 4, a
    single-GPU retry, another node): a rank the checkpoint has no state for takes rank 0's, which is what
    every rank held after seeding; no state (a CPU-written checkpoint) leaves the generator as seeded.
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
