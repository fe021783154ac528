"""What every test package shares: the checkout's root, free loopback ports, a child process's environment,
torchrun command lines and demo shards built through data_shards' Python API.

Imports nothing beyond the standard library at import time (data_shards only when demo shards are built), so
tests/gpu can use it on a GPU machine that has no Ray, MLflow or Optuna.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process (a trial, a CLI, torchrun): no inherited rank variables, this checkout
    first on the path, one OpenMP thread (this CPU machine is small); `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of `torchrun --nproc-per-node NPROC ARGS...` on loopback, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *map(str, args)]


def build_demo_shards(base: Path, classes: int = 6, train: int = 16, val: int = 4, test: int = 8, size: int = 64,
                      image_size: int = 32) -> Path:
    """Demo images written as real PNG files in CoOp's layout under BASE/raw, built into shards at
    BASE/shards/demo; returns BASE/shards (a trial's data.root)."""
    from data_shards import BuildOptions, build, write_demo

    raw, root = Path(base) / "raw", Path(base) / "shards"
    write_demo(raw, n_classes=classes, train=train, val=val, test=test, size=size)
    build("demo", raw, root / "demo", BuildOptions(image_size=image_size), progress=False)
    return root
