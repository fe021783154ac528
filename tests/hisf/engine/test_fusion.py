"""Fused groups (docs/fusion.md): a member's losses, metrics, exported prompts and checkpoint equal its solo run's, for
every method that fuses; members that leave early (done, pruned, diverged, stopped) leave the others unchanged; a
killed group resumes every member; 2 gloo ranks equal 1 rank with twice the batch per member.

Tolerances (CPU, fp32): what differs from a solo run is only how the prompt-side matrix products are batched over
members and the batch size the frozen encoders' GEMMs see. Measured after 2 epochs: bitwise equal for hisf and
hicropl; for coop and maple (their shared prompts' gradient sums over a member's samples through an expanded view,
in another order) prompts and SGD momentum within 3e-6 of their norm. We hold losses and metrics to rel 1e-5,
prompts, checkpointed tensors and optimiser state to 1e-5 of their norm, accuracies exactly.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import yaml

from hisf.config import ConfigError
from hisf.engine import NonFiniteLossError, StopTrial, TrialCallback, run_group, run_trial
from hisf.engine.group import check_group, fusion_key, why_alone
from tests.hisf.engine.helpers import (
    WORKTREE,
    child_env,
    tiny_trial,
    tiny_trial_dict,
    torchrun,
    without_timing,
)

HICROPL = {"method": {"name": "hicropl", "n_ctx": 2, "depth": 2, "cross_layer": 1}, "train": {"preset": "hicropl"}}
METHODS = {
    "zeroshot": {"method": {"name": "zeroshot"}},
    "coop": {"method": {"name": "coop"}},
    "maple": {"method": {"name": "maple", "depth": 2}},
    "hisf": {"method": {"name": "hisf", "depth": 2}},
    "hisf_no_pi_shared_fusion": {"method": {"name": "hisf", "depth": 2, "pi": False, "share_fusion": True,
                                            "le_detach": False}},
    "hisf_no_sf_frozen_e_no_cls": {"method": {"name": "hisf", "depth": 2, "sf": False, "label_embedding": "frozen",
                                              "cls_loss": False}},
    "hicropl": HICROPL,
}


def _member(root, out, method: str, k: int, **extra):
    """Member k of a group: its own seed, learning rate and (hisf) loss weights, as a searched or seeded row has."""
    sections = {key: dict(v) for key, v in METHODS[method].items()}
    sections["train"] = {**sections.get("train", {}), "lr": 0.02 * (k + 1), "log_every": 0, **extra.pop("train", {})}
    if sections["method"]["name"] == "hisf":
        sections["method"].update(lambda_le=0.5 * (k + 1), lambda_sa=1.5 - 0.25 * k, sf_zero_init=k % 2 == 0)
    return tiny_trial(root, out, seed=k + 1, **sections, **extra)


def _state(out):
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)


def close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """`a` equals `b` up to `rel` of b's norm (rounding differences spread over a tensor, whatever an element's size)."""
    err, size = float((a.double() - b.double()).norm()), float(b.double().norm())
    assert a.shape == b.shape and err <= rel * size + 1e-9, f"{what}: differs by {err:.3g} (norm {size:.3g})"


def assert_same_trial(fused_result, fused_out, solo_result, solo_out, exact_metrics=True):
    a, b = without_timing(fused_result), without_timing(solo_result)
    assert a.keys() == b.keys()
    for k in a:
        if exact_metrics and ("acc" in k or k == "hm"):
            assert a[k] == b[k], k
        else:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    # Per-class results and confusion matrices of every split: the same counts.
    files = sorted(p.name for p in (solo_out / "eval").glob("*.json"))
    assert files and files == sorted(p.name for p in (fused_out / "eval").glob("*.json"))
    for name in files:
        assert json.loads((fused_out / "eval" / name).read_text()) == json.loads((solo_out / "eval" / name).read_text())
    pa, pb = (torch.load(o / "prompts.pt", weights_only=True) for o in (fused_out, solo_out))
    assert pa["trainable"].keys() == pb["trainable"].keys() and pa["method"] == pb["method"]
    for k in pa["trainable"]:
        close(pa["trainable"][k], pb["trainable"][k], f"prompts {k}")
    has = [(o / "checkpoint" / "state.pt").is_file() for o in (fused_out, solo_out)]
    assert has[0] == has[1]
    if not has[0]:
        return  # nothing trains (zero-shot): no training state to compare
    sa, sb = _state(fused_out), _state(solo_out)
    assert (sa["epoch"], sa["global_step"], sa["skipped_steps"]) == (sb["epoch"], sb["global_step"], sb["skipped_steps"])
    for k in sa["trainable"]:
        close(sa["trainable"][k], sb["trainable"][k], f"checkpoint {k}")
    ma, mb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert ma.keys() == mb.keys()
    for i in ma:
        for k, v in ma[i].items():
            close(v, mb[i][k], f"optimizer state {i}.{k}")
    assert sa["scheduler"] == sb["scheduler"]


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_members_equal_their_solo_runs(demo_root, tmp_path, method):
    fused = [_member(demo_root, tmp_path / f"g{k}", method, k) for k in range(2)]
    solo = [_member(demo_root, tmp_path / f"s{k}", method, k) for k in range(2)]
    results = run_group(fused)
    for k, (cfg, alone) in enumerate(zip(fused, solo)):
        assert not isinstance(results[k], BaseException), results[k]
        assert_same_trial(results[k], tmp_path / f"g{k}", run_trial(alone), tmp_path / f"s{k}")
    if method != "zeroshot":
        # The members trained different things: equality to their own solo runs is not equality to each other.
        p0, p1 = (torch.load(tmp_path / f"g{k}" / "prompts.pt", weights_only=True)["trainable"] for k in range(2))
        assert any(not torch.equal(p0[k], p1[k]) for k in p0)


def test_bf16_members_stay_close_to_their_solo_runs(demo_root, tmp_path):
    """bf16 autocast: the batched products round differently from the solo ones; losses within 2e-2 relative."""
    fused = [_member(demo_root, tmp_path / f"g{k}", "hisf", k, train={"precision": "bf16"}) for k in range(2)]
    solo = [_member(demo_root, tmp_path / f"s{k}", "hisf", k, train={"precision": "bf16"}) for k in range(2)]
    for k, result in enumerate(run_group(fused)):
        alone = run_trial(solo[k])
        for key in ("train/loss", "train/loss_cls", "train/loss_le", "train/loss_sa"):
            assert result[key] == pytest.approx(alone[key], rel=2e-2), key
        assert abs(result["val_acc"] - alone["val_acc"]) <= 100 / 12 + 1e-9  # at most one of 12 images flips


class _PruneAt(TrialCallback):
    def __init__(self, epoch: int):
        self.epoch, self.seen = epoch, []

    def on_epoch_end(self, epoch, metrics, checkpoint_dir):
        self.seen.append(epoch)
        if epoch == self.epoch:
            raise StopTrial(f"pruned at epoch {epoch}")


def test_members_leave_early_and_the_rest_go_on_unchanged(demo_root, tmp_path):
    """Four members: one done after 1 epoch (its own `epochs`), one pruned after epoch 0, one diverging (NaN guard),
    one training all 3 epochs. Each ends as it would alone; the group re-packs and the last equals its solo run."""
    done = _member(demo_root, tmp_path / "done", "hisf", 0, train={"epochs": 1})
    pruned = _member(demo_root, tmp_path / "pruned", "hisf", 1, train={"epochs": 3})
    nan = _member(demo_root, tmp_path / "nan", "hisf", 2, train={"epochs": 3, "lr": 1e30, "max_nonfinite_steps": 1,
                                                                 "warmup_epochs": 0})
    full = _member(demo_root, tmp_path / "full", "hisf", 3, train={"epochs": 3})
    prune = _PruneAt(0)
    results = run_group([done, pruned, nan, full], [[], [prune], [], []])
    assert prune.seen == [0]
    assert results[1]["stopped"] == 1 and results[1]["epoch"] == 0
    assert isinstance(results[2], NonFiniteLossError)
    for cfg, result, out in ((done, results[0], "done"), (full, results[3], "full")):
        solo = cfg.__class__.from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / f"solo-{out}")})
        assert_same_trial(result, tmp_path / out, run_trial(solo), tmp_path / f"solo-{out}")
    alone = _PruneAt(0)
    solo_pruned = run_trial(pruned.__class__.from_dict({**pruned.to_dict(), "output_dir": str(tmp_path / "solo-pruned")}),
                            [alone])
    assert without_timing(results[1]) == pytest.approx(without_timing(solo_pruned), rel=1e-5, abs=1e-6)
    with pytest.raises(NonFiniteLossError, match="non-finite loss for 1 steps in a row"):
        run_trial(nan.__class__.from_dict({**nan.to_dict(), "output_dir": str(tmp_path / "solo-nan")}))


class _Killed(BaseException):
    """What a SIGKILL does to a group, in process: nothing of the group survives but its members' checkpoints."""


class _KillAfter(TrialCallback):
    def on_epoch_end(self, epoch, metrics, checkpoint_dir):
        raise _Killed()


def test_a_killed_group_resumes_every_member_as_a_solo_trial_resumes(demo_root, tmp_path):
    members = [_member(demo_root, tmp_path / f"g{k}", "hisf", k, train={"epochs": 3}) for k in range(3)]
    with pytest.raises(_Killed):
        run_group(members, [[], [], [_KillAfter()]])
    assert all(_state(tmp_path / f"g{k}")["epoch"] == 1 for k in range(3))  # each saved its first epoch
    # Regrouped: member 1 resumes alone, members 0 and 2 as a group of two; all end as if never interrupted.
    resumed = {1: run_trial(members[1])}
    resumed.update(zip((0, 2), run_group([members[0], members[2]])))
    for k in range(3):
        solo = _member(demo_root, tmp_path / f"s{k}", "hisf", k, train={"epochs": 3})
        assert_same_trial(resumed[k], tmp_path / f"g{k}", run_trial(solo), tmp_path / f"s{k}")


def test_who_may_share_a_group(demo_root, tmp_path):
    a, b = (_member(demo_root, tmp_path / f"m{k}", "hisf", k) for k in range(2))
    assert fusion_key(a) == fusion_key(b) and why_alone(a) is None
    check_group([a, b])
    other = tiny_trial(demo_root, tmp_path / "x", method={"name": "hisf", "depth": 1})
    assert fusion_key(other) != fusion_key(a)
    with pytest.raises(ConfigError, match=r"member 1 .* has method.depth = 1, member 0 2; members may differ only in"):
        check_group([a, other])
    zero = tiny_trial(demo_root, tmp_path / "z", seed=5, method={"name": "hisf", "depth": 2, "lambda_le": 0.0})
    with pytest.raises(ConfigError, match=r"method.lambda_le == 0 = True, member 0 False"):
        check_group([a, zero])
    released = tiny_trial(demo_root, tmp_path / "r", **{**HICROPL, "method": {**HICROPL["method"], "mapping": "released"}})
    assert "runs unfused" in why_alone(released)
    with pytest.raises(ConfigError, match="runs unfused"):
        check_group([released, tiny_trial(demo_root, tmp_path / "r2", seed=2, **{**HICROPL, "method": {
            **HICROPL["method"], "mapping": "released"}})])
    with pytest.raises(ConfigError, match="share an output_dir"):
        check_group([a, a])


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank_with_twice_the_batch_per_member(demo_root, tmp_path):
    """`hisf-bench train a.yaml b.yaml` under torchrun: a group of two members on 2 gloo ranks x batch 2 equals each
    member alone on 1 rank x batch 4."""
    paths = []
    for k in range(2):
        d = tiny_trial_dict(demo_root, tmp_path / f"two{k}", seed=k + 1, train={"batch_size": 2, "lr": 0.02 * (k + 1)})
        paths.append(tmp_path / f"two{k}.yaml")
        paths[-1].write_text(yaml.safe_dump(d))
    cmd = torchrun(2, "-m", "hisf.train", *paths)
    proc = subprocess.run(cmd, env=child_env(), cwd=WORKTREE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "member 2 of a group of 2" in proc.stderr and "2 rank(s) x batch 2, 3 steps/epoch" in proc.stderr
    torch.set_num_threads(1)
    for k in range(2):
        one = run_trial(tiny_trial(demo_root, tmp_path / f"one{k}", seed=k + 1, train={"batch_size": 4,
                                                                                     "lr": 0.02 * (k + 1)}))
        two = json.loads((tmp_path / f"two{k}" / "metrics.json").read_text())["final"]
        for key in ("train/loss", "train/loss_cls", "train/loss_le", "train/loss_sa"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=2e-7), key
        for key in ("val_acc", "base_acc", "novel_acc", "hm"):
            assert two[key] == pytest.approx(one[key], abs=1e-9), key
        for split in ("val", "base", "novel"):  # counts summed over the ranks once: each image counted once
            a, b = (json.loads((tmp_path / f"{o}{k}" / "eval" / f"{split}.json").read_text()) for o in ("two", "one"))
            assert a["confusion"] == b["confusion"] and a["total"] == b["total"] > 0, split
        assert math.isfinite(two["train/loss"])
