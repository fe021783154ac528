"""Whole trials on CUDA in fresh processes: resume after SIGKILL, a 1-rank NCCL group, 2 NCCL ranks against
1 rank with twice the batch, and the trial's loaders feeding the GPU from pinned memory."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.helpers import RUNNER, cuda_trial_dict, trial_env
from tests.hisf.engine.helpers import (WORKTREE, final_metrics, free_port, tiny_trial, torchrun, without_timing,
                                       write_yaml)

pytestmark = pytest.mark.gpu


def _run(*args, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, args)), env=trial_env(), cwd=WORKTREE, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def _prompts(out: Path) -> dict:
    return torch.load(out / "prompts.pt", weights_only=True)["trainable"]


# fp16 with GradScaler (its scale is checkpointed too), 3 epochs x 3 steps, deterministic mode.
FP16_3_EPOCHS = {"train": {"epochs": 3, "precision": "fp16"}}


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory) -> Path:
    """One plain CUDA trial run to the end in its own process (the reference of the resume and NCCL tests)."""
    out = tmp_path_factory.mktemp("whole")
    _run(sys.executable, RUNNER, write_yaml(out / "whole.yaml", cuda_trial_dict(demo_root, out / "run", **FP16_3_EPOCHS)))
    return out / "run"


def test_trial_killed_on_cuda_resumes_to_identical_metrics(demo_root, tmp_path, uninterrupted):
    """SIGKILL at step 5 (inside epoch 2): the resumed trial ends with exactly the metrics and prompts of an
    uninterrupted one."""
    killed = write_yaml(tmp_path / "killed.yaml", cuda_trial_dict(demo_root, tmp_path / "killed", **FP16_3_EPOCHS))
    _run(sys.executable, RUNNER, killed, "--kill-at", 5, expect=-signal.SIGKILL)
    state = torch.load(tmp_path / "killed" / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 3 and state["scaler"]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = _run(sys.executable, RUNNER, killed)
    assert "from epoch 1/3" in resumed.stderr
    assert without_timing(final_metrics(tmp_path / "killed")) == without_timing(final_metrics(uninterrupted))
    pk, pw = _prompts(tmp_path / "killed"), _prompts(uninterrupted)
    assert pk.keys() == pw.keys() and all(torch.equal(pk[k], pw[k]) for k in pk)


def test_one_rank_nccl_group_equals_the_plain_trial(demo_root, tmp_path, uninterrupted):
    """The engine inside a 1-rank NCCL group made beforehand (as Ray Train makes it) runs the trial on the
    group's GPU and gets exactly the plain process's numbers."""
    group = write_yaml(tmp_path / "group.yaml", cuda_trial_dict(demo_root, tmp_path / "group", **FP16_3_EPOCHS))
    _run(sys.executable, RUNNER, group, "--nccl-port", free_port())
    got, want = without_timing(final_metrics(tmp_path / "group")), without_timing(final_metrics(uninterrupted))
    assert got == want and want["epoch"] == 2


@pytest.mark.gpu(devices=2)
def test_two_nccl_ranks_equal_one_rank_with_twice_the_batch(demo_root, tmp_path):
    """torchrun, 2 ranks x batch 2 on two GPUs against 1 rank x batch 4, fp32: the same samples per step, the
    gradients all-reduced over NCCL, so the same training up to reduction order."""
    two = write_yaml(tmp_path / "two.yaml", cuda_trial_dict(demo_root, tmp_path / "two", train={"batch_size": 2, "precision": "fp32"}))
    one = write_yaml(tmp_path / "one.yaml", cuda_trial_dict(demo_root, tmp_path / "one", train={"batch_size": 4, "precision": "fp32"}))
    proc = _run(*torchrun(2, "-m", "hisf.train", two))
    assert "2 rank(s) x batch 2, 3 steps/epoch" in proc.stderr
    _run(sys.executable, RUNNER, one)
    got, want = final_metrics(tmp_path / "two"), final_metrics(tmp_path / "one")
    assert set(got) == set(want)
    for key in ("train/loss", "train/loss_cls", "train/loss_le", "train/loss_sa"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    for key in ("val_acc", "base_acc", "novel_acc", "hm", "lr", "skipped_steps", "trainable_params"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    p2, p1 = _prompts(tmp_path / "two"), _prompts(tmp_path / "one")
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_trial_loaders_feed_cuda_from_pinned_memory(cuda, demo_root, tmp_path, workers):
    """On a CUDA trial the train and validation batches arrive in pinned memory, copy to the GPU without
    blocking, and hold exactly the values the CPU trial's loaders give."""
    from hisf.engine.distributed import DistEnv
    from hisf.engine.trial_data import open_trial_data
    from hisf.model.backbone import load_backbone

    cfg = tiny_trial(demo_root, tmp_path, device="cuda", data={"num_workers": workers})
    backbone = load_backbone(cfg.backbone)
    feeds = {}
    for name, dev in (("cuda", cuda), ("cpu", torch.device("cpu"))):
        data = open_trial_data(cfg, DistEnv(0, 1, 0, dev, owns_group=False))
        data.bind(backbone, cfg)
        feeds[name] = data
    pairs = [*zip(feeds["cuda"].train_loader(epoch=1), feeds["cpu"].train_loader(epoch=1)),
             *zip(feeds["cuda"].val_loader(), feeds["cpu"].val_loader())]
    assert len(pairs) == len(feeds["cpu"].train_loader(epoch=1)) + len(feeds["cpu"].val_loader()) > 2
    for (images, labels), (want_images, want_labels) in pairs:
        assert images.is_pinned() and labels.is_pinned()
        on_gpu = images.to(cuda, non_blocking=True), labels.to(cuda, non_blocking=True)
        torch.cuda.synchronize(cuda)
        assert on_gpu[0].device == cuda
        assert torch.equal(on_gpu[0].cpu(), want_images) and torch.equal(on_gpu[1].cpu(), want_labels)


def test_deterministic_reduce_overhead_trial_keeps_cuda_graphs(demo_root, tmp_path, caplog):
    """train.deterministic with CUDA graphs: Inductor lowers the text pooling's accumulating index backward to
    aten's deterministic kernel; torch >= 2.10 keeps CUDA graphs for it (older torch turns them off, and the
    trial's log must then say so). Last in the file: the one cold compile here is the most expendable test."""
    import logging

    from torch._dynamo.utils import counters

    from hisf.config import TrialConfig
    from hisf.engine import run_trial
    from hisf.engine.step import CUDAGRAPH_DETERMINISTIC_FIX, torch_version

    cfg = cuda_trial_dict(demo_root, tmp_path / "det", train={"epochs": 1, "compile": True,
                                                             "compile_mode": "reduce-overhead", "deterministic": True})
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="hisf.engine"):
        result = run_trial(TrialConfig.from_dict(cfg))
    assert result["train/loss"] == result["train/loss"] and counters["frames"]["ok"] > 0  # finite, compiled
    skipped = [r.getMessage() for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    if torch_version() >= CUDAGRAPH_DETERMINISTIC_FIX:
        assert skipped == [] and not counters["inductor"]["cudagraph_skips"], skipped
    else:
        assert len(skipped) == 1 and "under train.deterministic" in skipped[0], skipped
