"""The plain train step: exact SGD update, precision handling, skipped steps, the NaN guard, grad sync over gloo."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from hisf.engine import NanGuard, NonFiniteLossError, resolve_precision, train_step
from hisf.engine.distributed import DistEnv, barrier, init_from_env, shutdown
from tests.hisf.engine.helpers import TinyPromptModel, free_port, member_states

CPU1 = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)


def _setup(model, **train):
    return member_states(model, **train)


def _step(model, images, labels, states, precision, env=CPU1):
    """One step of a one-member model: its StepResult."""
    (res,) = train_step(model, images, labels, states, precision, env)
    return res


def test_fp32_step_equals_hand_written_sgd(tiny_model, tiny_batch):
    images, labels = tiny_batch
    ref = copy.deepcopy(tiny_model)
    states = _setup(tiny_model)
    res = _step(tiny_model, images, labels, states, resolve_precision("fp32", torch.device("cpu")))

    out = ref.forward_losses(images, labels)
    out["loss"].backward()
    with torch.no_grad():
        for p_new, (name, p) in zip(tiny_model.parameters(), ref.named_parameters()):
            if p.requires_grad:
                # SGD with momentum, first step: v = g + wd * p; p -= lr * v.
                expected = p - 0.1 * (p.grad + 5e-4 * p)
                torch.testing.assert_close(p_new, expected, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p_new, p), name
    assert res.losses["loss"] == pytest.approx(out["loss"].item(), rel=1e-6)
    assert res.losses["loss_cls"] == pytest.approx(out["loss_cls"].item(), rel=1e-6)
    assert res.finite and not res.skipped


def test_bf16_autocast_step_close_to_fp32(tiny_batch):
    images, labels = tiny_batch
    losses = {}
    for name in ("fp32", "bf16"):
        model = TinyPromptModel()
        states = _setup(model)
        losses[name] = _step(model, images, labels, states, resolve_precision(name, torch.device("cpu")))
    assert losses["bf16"].losses["loss"] == pytest.approx(losses["fp32"].losses["loss"], rel=3e-2)
    assert losses["bf16"].losses["loss"] != losses["fp32"].losses["loss"]


def test_fp16_on_cpu_falls_back_to_bf16_with_warning():
    with pytest.warns(UserWarning, match="fp16 needs CUDA; running bf16"):
        p = resolve_precision("fp16", torch.device("cpu"))
    assert (p.name, p.dtype, p.grad_scaling, p.new_scaler()) == ("bf16", torch.bfloat16, False, None)


def test_nonfinite_loss_skips_the_update(tiny_batch):
    images, labels = tiny_batch
    model = TinyPromptModel()
    states = _setup(model)
    with torch.no_grad():
        model.labels[0, 0, 0] = float("nan")
    before = model.trainable_state_dict()
    res = _step(model, images, labels, states, resolve_precision("fp32", torch.device("cpu")))
    assert res.skipped and not res.finite and math.isnan(res.losses["loss"])
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_nan_guard_counts_consecutive_nonfinite_losses():
    guard = NanGuard(3)
    for finite in (False, False, True, False, False):
        guard.update(finite, 0, {})
    assert guard.consecutive == 2
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss for 3 steps in a row.*max_nonfinite_steps=3"):
        guard.update(False, 7, {"loss": float("nan")})


def _rank_steps(rank, world, port, images, labels, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_from_env("cpu")
    model = TinyPromptModel()
    states = _setup(model)
    b = images.shape[0] // world
    losses = []
    for _ in range(steps):
        res = _step(model, images[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b], states,
                    resolve_precision("fp32", env.device), env)
        losses.append(res.losses["loss"])
    # numpy copies: tensors would travel as shared-memory handles that die with this process.
    out.put((rank, losses, {k: v.numpy() for k, v in model.trainable_state_dict().items()}))
    # Both ranks reach teardown together: a rank destroying its gloo group while the other still holds the
    # pair can abort the process ("terminate called without an active exception").
    barrier(env)
    shutdown(env)


def test_two_gloo_ranks_equal_one_rank_with_twice_the_batch(tiny_batch):
    images, labels = tiny_batch
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_steps, args=(r, 2, port, images, labels, 3, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        rank, losses, sd = q.get(timeout=120)
        results[rank] = (losses, sd)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    model = TinyPromptModel()
    states = _setup(model)
    ref_losses = [_step(model, images, labels, states, resolve_precision("fp32", torch.device("cpu"))).losses["loss"]
                  for _ in range(3)]
    for rank in (0, 1):
        losses, sd = results[rank]
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for k, v in model.trainable_state_dict().items():
            torch.testing.assert_close(torch.from_numpy(sd[k]), v, rtol=1e-5, atol=1e-6)
    # The step did move the parameters: equality is not the trivial "nothing trained".
    assert not torch.allclose(model.prompt, TinyPromptModel().prompt)


def test_grad_scaler_overflow_is_a_counted_skipped_step(tiny_batch):
    """The fp16 path's skip logic, on CPU: a scale so large the scaled grads overflow must skip and back off."""
    from hisf.engine import Precision

    images, labels = tiny_batch
    model = TinyPromptModel()
    states = _setup(model)
    before = model.trainable_state_dict()
    prec = Precision("fp16", "cpu", None, grad_scaling=True)
    states[0].scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    res = _step(model, images, labels, states, prec)
    assert res.skipped and res.finite
    assert states[0].scaler.get_scale() == pytest.approx(1.5e38)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, before[k]), k
    # A sane scale steps exactly like fp32 (the scaler unscales before SGD).
    states[0].scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    res = _step(model, images, labels, states, prec)
    ref = TinyPromptModel()
    ref_states = _setup(ref)
    _step(ref, images, labels, ref_states, resolve_precision("fp32", torch.device("cpu")))
    assert not res.skipped
    for k, v in ref.trainable_state_dict().items():
        torch.testing.assert_close(model.trainable_state_dict()[k], v, rtol=1e-6, atol=1e-7)
