"""A trial resumes only its own run: the same config, global batch (ranks x batch) and data builds; else it says why."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from hisf.config import replace_path
from hisf.engine import run_trial
from hisf.engine.checkpoint import ResumeError
from tests.hisf.engine.helpers import (
    WORKTREE,
    build_demo,
    child_env,
    tiny_trial,
    tiny_trial_dict,
    torchrun,
    without_timing,
)


def test_two_ranks_refuse_a_one_rank_checkpoint(demo_root, tmp_path):
    """The issue's case: a 2-rank torchrun after a 1-rank run of the same YAML (3 steps per epoch, then 1)."""
    out = tmp_path / "run"
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(tiny_trial_dict(demo_root, out)))
    run_trial(tiny_trial(demo_root, out))
    before = (out / "metrics.json").read_text()

    cmd = torchrun(2, "-m", "hisf.train", config)
    proc = subprocess.run(cmd, env=child_env(), cwd=WORKTREE, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "the global batch is 4 there (1 rank(s) x 4), 8 now (2 rank(s) x 4)" in proc.stderr
    assert f"rerun with --fresh (deletes {out / 'checkpoint'}" in proc.stderr and "resuming" not in proc.stderr
    # Nothing of the old run was touched (`--fresh`, which deletes checkpoint/ and trains anew: test_train_cli.py).
    assert (out / "metrics.json").read_text() == before


def test_moved_data_resumes_and_rebuilt_data_is_refused(demo_root, tmp_path):
    cfg = tiny_trial(demo_root, tmp_path / "run", train={"epochs": 1})
    first = run_trial(cfg)
    # The same build in another folder (data.root may change between a kill and the restart): resumed.
    moved = tmp_path / "moved"
    shutil.copytree(demo_root, moved)
    assert without_timing(run_trial(replace_path(cfg, "data.root", str(moved)))) == without_timing(first)
    # A rebuild with other images under the same name: another run's data.
    other = build_demo(tmp_path / "other", classes=6, train=8, val=4, test=6, size=36, image_size=32)
    with pytest.raises(ResumeError, match=r"checkpoint belongs to another run: dataset 'demo' is build [0-9a-f]{16} "
                                          r"there, [0-9a-f]{16} now \(rebuilt, or other images\)"):
        run_trial(replace_path(cfg, "data.root", str(other)))
