"""Optimiser presets and the warm-up + cosine schedule against docs/method.md and Dassl's reference schedule."""

from __future__ import annotations

import math

import pytest
import torch

from hisf.config import ConfigError, TrainConfig
from hisf.engine.optim import build_optimizer, build_param_groups, build_scheduler


def test_paper_preset_is_maples_sgd(tiny_model):
    opt = build_optimizer(TrainConfig(preset="paper"), tiny_model.param_groups())
    assert isinstance(opt, torch.optim.SGD)
    (g,) = opt.param_groups
    assert g["lr"] == pytest.approx(0.0035)
    assert g["momentum"] == pytest.approx(0.9)
    assert g["weight_decay"] == pytest.approx(5e-4)
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert {id(p) for p in g["params"]} == trainable
    assert len(g["params"]) == 6


def test_hicropl_preset_is_the_released_adam(tiny_model):
    cfg = TrainConfig(preset="hicropl", epochs=50)
    opt = build_optimizer(cfg, tiny_model.param_groups())
    assert type(opt) is torch.optim.Adam  # coupled L2 weight decay (Dassl's Adam), not AdamW
    (g,) = opt.param_groups
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (0.0025, (0.9, 0.999), 1e-3, 5e-4)
    assert {id(p) for p in g["params"]} == {id(p) for p in tiny_model.parameters() if p.requires_grad}
    # Coupled: one step from zero moment is lr * sign-ish of (grad + wd * p); with a zero grad only the decay acts.
    p = g["params"][0]
    before = p.detach().clone()
    for q in g["params"]:
        q.grad = torch.zeros_like(q)
    opt.step()
    expected = before - 0.0025 * (5e-4 * before) / ((5e-4 * before).abs() + 1e-3)
    torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-6)
    # 1 warm-up epoch at constant 1e-5, then cosine over the epochs, stepped per epoch.
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[1] == pytest.approx(0.0025)
    assert lrs[2] == pytest.approx(0.0025 * 0.5 * (1 + math.cos(math.pi / 50)))


def test_adamw_groups_prompt_lr_and_decay_only_on_projection_matrices(tiny_model):
    """Over a member's views (a solo trial's shapes: a bias is 1-D there, whatever the member axis adds)."""
    from hisf.engine.optim import member_views

    cfg = TrainConfig(preset="adamw", lr=2e-3, weight_decay=0.05, prompt_lr_mult=10.0)
    views, _ = member_views(tiny_model, 0)
    opt = build_optimizer(cfg, views)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["prompts"]["lr"] == pytest.approx(2e-2)
    assert groups["label_embeddings"]["lr"] == pytest.approx(2e-2)
    assert groups["projection_weights"]["lr"] == pytest.approx(2e-3)
    assert groups["fusion"]["lr"] == pytest.approx(2e-3)
    decayed = [n for n, g in groups.items() if g["weight_decay"] > 0]
    assert decayed == ["projection_weights"]
    assert groups["projection_weights"]["weight_decay"] == pytest.approx(0.05)
    (weight,), (bias,) = groups["projection_weights"]["params"], groups["projection_biases"]["params"]
    assert weight.data_ptr() == tiny_model.proj_weight.data_ptr() and weight.shape == tiny_model.proj_weight.shape[1:]
    assert bias.data_ptr() == tiny_model.proj_bias.data_ptr() and bias.ndim == 1


def test_frozen_and_duplicate_params_are_dropped(tiny_model):
    groups = tiny_model.param_groups()
    groups["fusion"] = groups["fusion"] + [tiny_model.prompt, tiny_model.encoder.weight]
    (g,) = build_param_groups(TrainConfig(preset="paper"), groups)
    assert len(g["params"]) == 6


def test_unknown_group_and_empty_model_raise(tiny_model):
    with pytest.raises(ValueError, match="unknown group 'extras'"):
        build_param_groups(TrainConfig(), {"extras": [tiny_model.prompt]})
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(TrainConfig(), {"prompts": []})


def _dassl_lrs(base, warmup_lr, epochs):
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs), warmup_epoch=1): lr per epoch."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = [warmup_lr]
    for e in range(1, epochs):
        lrs.append(cos.get_last_lr()[0])
        opt.step()
        cos.step()
    return lrs


@pytest.mark.parametrize("epochs", [5, 10])
def test_schedule_matches_dassl_warmup_cosine(tiny_model, epochs):
    cfg = TrainConfig(preset="paper", epochs=epochs)
    opt = build_optimizer(cfg, tiny_model.param_groups())
    sched = build_scheduler(opt, cfg)
    got = []
    for _ in range(epochs):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = _dassl_lrs(0.0035, 1e-5, epochs)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got[0] == pytest.approx(1e-5) and got[1] == pytest.approx(0.0035)
    assert got[2] == pytest.approx(0.0035 * 0.5 * (1 + math.cos(math.pi / epochs)))


def test_schedule_warmup_is_absolute_for_every_adamw_group(tiny_model):
    cfg = TrainConfig(preset="adamw", epochs=3, lr=1e-3)
    opt = build_optimizer(cfg, tiny_model.param_groups())
    build_scheduler(opt, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5] * len(opt.param_groups))


def test_scheduler_state_round_trip(tiny_model):
    cfg = TrainConfig(preset="paper", epochs=6)
    opt = build_optimizer(cfg, tiny_model.param_groups())
    sched = build_scheduler(opt, cfg)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(cfg, tiny_model.param_groups())
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0035 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
