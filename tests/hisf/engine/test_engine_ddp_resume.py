"""Real subprocesses: 2 gloo ranks under torchrun equal 1 rank with twice the batch; a SIGKILLed trial resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine_helpers import WORKTREE, free_port, tiny_trial, tiny_trial_dict, without_timing
from engine_helpers import subprocess_env as _env
from hisf.engine import run_trial


def _write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def _final(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["final"]


def test_two_gloo_ranks_under_torchrun_equal_one_rank_with_twice_the_batch(demo_root, tmp_path):
    two = _write(tmp_path / "two.yaml", tiny_trial_dict(demo_root, tmp_path / "two", train={"batch_size": 2}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "hisf.train", str(two)]
    proc = subprocess.run(cmd, env=_env(), cwd=WORKTREE, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) x batch 2, 3 steps/epoch" in proc.stderr
    # One progress line per step (log_every 1) with loss terms, lr, images/s and ETA, on rank 0 only.
    progress = [l for l in proc.stderr.splitlines() if " step " in l and "img/s ETA" in l]
    assert len(progress) == 6 and "step 6/6 loss" in progress[-1] and "(cls " in progress[-1]

    torch.set_num_threads(1)
    one = run_trial(tiny_trial(demo_root, tmp_path / "one", train={"batch_size": 4}))
    two_result = _final(tmp_path / "two")
    assert set(two_result) == set(one)
    for key in ("train/loss", "train/loss_cls", "train/loss_le", "train/loss_sa"):
        assert two_result[key] == pytest.approx(one[key], rel=1e-5), key
    # Accuracies are all-reduced counts over both ranks' halves of the evaluation splits.
    for key in ("val_acc", "base_acc", "novel_acc", "hm", "lr", "skipped_steps", "trainable_params"):
        assert two_result[key] == pytest.approx(one[key], abs=1e-9), key
    p1 = torch.load(tmp_path / "one" / "prompts.pt", weights_only=True)["trainable"]
    p2 = torch.load(tmp_path / "two" / "prompts.pt", weights_only=True)["trainable"]
    init = torch.load(tmp_path / "one" / "checkpoint" / "state.pt", weights_only=True)
    assert init["epoch"] == 2
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-6)


KILLER = """
import os, signal, sys
from hisf.config import TrialConfig
from hisf.engine import TrialCallback, run_trial

class KillAt(TrialCallback):
    def on_progress(self, step, total, metrics):
        if step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

run_trial(TrialConfig.from_yaml(sys.argv[1]), [KillAt()])
"""


def kill_then_finish(demo_root, tmp_path, sections: dict, timeout: int = 240) -> dict[str, str]:
    """Two copies of a 3-epoch x 3-step trial: `killed` is SIGKILLed at step 5 (inside epoch 2, after epoch 1's
    checkpoint, which is checked) and rerun; `whole` runs uninterrupted. Returns each rerun's stderr."""
    killed = _write(tmp_path / "killed.yaml", tiny_trial_dict(demo_root, tmp_path / "killed", **sections))
    whole = _write(tmp_path / "whole.yaml", tiny_trial_dict(demo_root, tmp_path / "whole", **sections))

    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), "5"], env=_env(), cwd=WORKTREE,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "killed" / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert not [p for p in (tmp_path / "killed" / "checkpoint").iterdir() if p.name != "state.pt"]

    logs = {}
    for name, cfg in (("killed", killed), ("whole", whole)):
        proc = subprocess.run([sys.executable, "-m", "hisf.train", str(cfg)], env=_env(), cwd=WORKTREE,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = proc.stderr
    return logs


def test_trial_killed_mid_epoch_resumes_to_the_same_metrics(demo_root, tmp_path):
    logs = kill_then_finish(demo_root, tmp_path, {"train": {"epochs": 3}})
    assert "from epoch 1/3" in logs["killed"] and "resuming" not in logs["whole"]
    resumed, uninterrupted = _final(tmp_path / "killed"), _final(tmp_path / "whole")
    assert without_timing(resumed) == without_timing(uninterrupted)
    history = json.loads((tmp_path / "killed" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    pk = torch.load(tmp_path / "killed" / "prompts.pt", weights_only=True)["trainable"]
    pw = torch.load(tmp_path / "whole" / "prompts.pt", weights_only=True)["trainable"]
    assert all(torch.equal(pk[k], pw[k]) for k in pk)
