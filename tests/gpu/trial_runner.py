"""One trial in a fresh process for the CUDA tests: deterministic flags, optionally SIGKILLed at a step,
optionally inside a 1-rank NCCL group created beforehand (Ray Train's TorchTrainer path).

    python tests/gpu/trial_runner.py CONFIG.yaml [--kill-at STEP] [--nccl-port PORT]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for `tests.gpu.helpers`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hisf.config import TrialConfig  # noqa: E402
from hisf.engine import TrialCallback, run_trial  # noqa: E402
from tests.gpu.helpers import deterministic_flags  # noqa: E402


class KillAt(TrialCallback):
    def __init__(self, step: int):
        self.step = step

    def on_progress(self, step, total, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--nccl-port", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # the engine's progress lines
    deterministic_flags()
    if args.nccl_port:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.nccl_port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
        t = torch.full((3,), 2.0, device="cuda")
        dist.all_reduce(t)
        dist.barrier(device_ids=[0])
        assert t.tolist() == [2.0, 2.0, 2.0], t
    callbacks = [KillAt(args.kill_at)] if args.kill_at else []
    run_trial(TrialConfig.from_yaml(args.config), callbacks)
    if args.nccl_port:
        # run_trial found the group already made (owns_group False), so it is left for its creator to end.
        assert dist.is_initialized()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
