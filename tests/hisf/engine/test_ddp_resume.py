"""Real subprocesses: 2 gloo ranks under torchrun equal 1 rank with twice the batch; a SIGKILLed trial resumes exactly."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from hisf.engine import run_trial
from tests.hisf.engine.helpers import (
    WORKTREE,
    child_env,
    final_metrics,
    kill_then_finish,
    tiny_trial,
    tiny_trial_dict,
    torchrun,
    without_timing,
    write_yaml,
)


def test_two_gloo_ranks_under_torchrun_equal_one_rank_with_twice_the_batch(demo_root, tmp_path):
    two = write_yaml(tmp_path / "two.yaml", tiny_trial_dict(demo_root, tmp_path / "two", train={"batch_size": 2}))
    proc = subprocess.run(torchrun(2, "-m", "hisf.train", two), env=child_env(), cwd=WORKTREE, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) x batch 2, 3 steps/epoch" in proc.stderr
    # One progress line per step (log_every 1) with loss terms, lr, images/s and ETA, on rank 0 only.
    progress = [l for l in proc.stderr.splitlines() if " step " in l and "img/s ETA" in l]
    assert len(progress) == 6 and "step 6/6 loss" in progress[-1] and "(cls " in progress[-1]

    torch.set_num_threads(1)
    one = run_trial(tiny_trial(demo_root, tmp_path / "one", train={"batch_size": 4}))
    two_result = final_metrics(tmp_path / "two")
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


def test_trial_killed_mid_epoch_resumes_to_the_same_metrics(demo_root, tmp_path):
    logs = kill_then_finish(demo_root, tmp_path, {"train": {"epochs": 3}})
    assert "from epoch 1/3" in logs["killed"] and "resuming" not in logs["whole"]
    resumed, uninterrupted = final_metrics(tmp_path / "killed"), final_metrics(tmp_path / "whole")
    assert without_timing(resumed) == without_timing(uninterrupted)
    history = json.loads((tmp_path / "killed" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    pk = torch.load(tmp_path / "killed" / "prompts.pt", weights_only=True)["trainable"]
    pw = torch.load(tmp_path / "whole" / "prompts.pt", weights_only=True)["trainable"]
    assert all(torch.equal(pk[k], pw[k]) for k in pk)
