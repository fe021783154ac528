"""HiCroPL through the real engine: 2 gloo ranks equal 1 rank x 2B, and a SIGKILLed trial resumes exactly, in both mappings."""

from __future__ import annotations

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

TERMS = ("train/loss", "train/loss_cls", "train/loss_distill_text", "train/loss_distill_image")


def _method(mapping: str) -> dict:
    # `released` with its visual prompts over one storage (aliased parameters): the case DDP and resume must keep.
    storage = {"released_storage": "shared"} if mapping == "released" else {}
    return {"name": "hicropl", "depth": 2, "cross_layer": 1, "n_ctx": 4, "mapping": mapping, "lambda_distill": 2.0,
            **storage}


@pytest.mark.slow
@pytest.mark.parametrize("mapping", ["learned", "released"])
def test_hicropl_two_gloo_ranks_equal_one_rank_with_twice_the_batch(demo_root, tmp_path, mapping):
    # `released` rewrites the prompts at every forward, and evaluation forwards depend on how the split is
    # divided over ranks; without per-epoch validation every rank and the single rank run the same forwards.
    train = {"preset": "hicropl", "lr": 0.01, "validate_every_epoch": mapping == "learned"}
    sections = {"method": _method(mapping)}
    two = write_yaml(tmp_path / "two.yaml", tiny_trial_dict(demo_root, tmp_path / "two", train={**train, "batch_size": 2},
                                                             **sections))
    proc = subprocess.run(torchrun(2, "-m", "hisf.train", two), env=child_env(), cwd=WORKTREE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) x batch 2, 3 steps/epoch" in proc.stderr
    assert "(cls " in proc.stderr and "distill_text " in proc.stderr and "distill_image " in proc.stderr

    torch.set_num_threads(1)
    one = run_trial(tiny_trial(demo_root, tmp_path / "one", train={**train, "batch_size": 4}, **sections))
    two_result = final_metrics(tmp_path / "two")
    assert set(two_result) == set(one) and set(TERMS) <= set(one)
    for key in TERMS:
        # abs: a distillation term is 1 - (a cosine near 1), so float32's rounding of the cosine (~6e-8 near 1)
        # is all that can differ, whatever the term's own size.
        assert two_result[key] == pytest.approx(one[key], rel=1e-5, abs=2e-7), key
    assert one["train/loss_distill_text"] > 0 and one["train/loss_distill_image"] > 0
    if mapping == "learned":
        for key in ("val_acc", "base_acc", "novel_acc", "hm", "lr", "skipped_steps", "trainable_params"):
            assert two_result[key] == pytest.approx(one[key], abs=1e-9), key
    # Exported before the final evaluation: the trained (and, for `released`, written-back) prompts.
    p1 = torch.load(tmp_path / "one" / "prompts.pt", weights_only=True)["trainable"]
    p2 = torch.load(tmp_path / "two" / "prompts.pt", weights_only=True)["trainable"]
    assert p1.keys() == p2.keys() and "prompts.cross_prompts_visual.1" in p1
    if mapping == "released":  # D parameters over one storage: one entry each, equal values
        assert torch.equal(p1["prompts.cross_prompts_visual.1"], p1["prompts.cross_prompts_visual.0"])
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mapping", ["learned", "released"])
def test_hicropl_trial_killed_mid_epoch_resumes_to_the_same_metrics(demo_root, tmp_path, mapping):
    sections = {"train": {"epochs": 3, "preset": "hicropl", "lr": 0.01}, "method": _method(mapping)}
    kill_then_finish(demo_root, tmp_path, sections, timeout=600)
    resumed, uninterrupted = final_metrics(tmp_path / "killed"), final_metrics(tmp_path / "whole")
    assert without_timing(resumed) == without_timing(uninterrupted)
    assert set(TERMS) <= set(resumed)
    pk = torch.load(tmp_path / "killed" / "prompts.pt", weights_only=True)["trainable"]
    pw = torch.load(tmp_path / "whole" / "prompts.pt", weights_only=True)["trainable"]
    assert pk.keys() == pw.keys() and all(torch.equal(pk[k], pw[k]) for k in pk)
