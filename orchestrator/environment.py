"""Where a trial ran, as MLflow tags (`env.*`): interpreter, torch/CUDA/cuDNN, GPUs and driver, host, the versions of
the packages that change numbers, the code's git state, and the precision and compile mode that actually ran.

Reproduction disputes are mostly about environments (PyTorch version, GPU, CUDA): every trial run records its
own, and the report (orchestrator/report/environments.py) shows which environments a table's runs came from.
Package versions come from importlib.metadata: nothing here imports Ray, MLflow or Optuna.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import shutil
import socket
import subprocess
from pathlib import Path

PREFIX = "env."
# Distributions whose versions are recorded (open_clip builds the model; the rest move data, trials and tracking).
PACKAGES = ("open_clip_torch", "ray", "mlflow", "optuna", "webdataset", "pyarrow")
NONE = "none"
UNKNOWN = "unknown"


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return NONE


def nvidia_driver() -> str:
    """The NVIDIA driver version nvidia-smi reports (its first GPU's), `none` without nvidia-smi or a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return NONE
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return NONE
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else NONE


def git_state(repo: str | Path | None = None) -> tuple[str, str]:
    """(commit, dirty) of the checkout holding this code: dirty is `true` when tracked files differ from the
    commit, `unknown` (both) outside a git checkout or without git."""
    where = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, UNKNOWN
    if head.returncode != 0 or status.returncode != 0 or not head.stdout.strip():
        return UNKNOWN, UNKNOWN
    return head.stdout.strip(), "true" if status.stdout.strip() else "false"


def gpu_tags() -> dict[str, str]:
    """The CUDA devices this process sees: names (`2x NVIDIA A100-SXM4-40GB`), count, memory of the first."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return {"gpu": NONE, "gpu_count": "0", "gpu_memory_gib": NONE}
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    grouped = [f"{names.count(n)}x {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names)]
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {"gpu": " + ".join(grouped), "gpu_count": str(count), "gpu_memory_gib": f"{memory:.1f}"}


@functools.lru_cache(maxsize=1)
def _process_environment() -> tuple[tuple[str, str], ...]:
    # What cannot change during a process's life: read once per worker (nvidia-smi and git cost ~0.1 s).
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    commit, dirty = git_state()
    tags = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or NONE,
        "cudnn": str(cudnn) if cudnn else NONE,
        **gpu_tags(),
        "driver": nvidia_driver(),
        "hostname": socket.gethostname(),
        **{dist: package_version(dist) for dist in PACKAGES},
        "git_commit": commit,
        "git_dirty": dirty,
    }
    return tuple(tags.items())


def environment_tags(precision: str, compile_mode: str | bool | None, device_name: str | None = None) -> dict[str, str]:
    """The `env.*` tags of one trial run.

    `precision` and `compile_mode` are what the engine ran after any fallback (fp16 becomes bf16 on a CPU;
    `off` when not compiled), `device_name` the engine's description of its device (`cuda:0 (NVIDIA H200)`).
    """
    if compile_mode in (None, False, ""):
        compile_mode = "off"
    elif compile_mode is True:
        compile_mode = "default"
    tags = dict(_process_environment())
    tags.update({"precision": str(precision), "compile": str(compile_mode)})
    if device_name is not None:
        tags["device"] = str(device_name)
    return {PREFIX + k: v for k, v in tags.items()}
