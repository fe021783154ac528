"""The training step on CUDA: fp16 + GradScaler and bf16 against fp32, compiled (default, CUDA graphs) against
eager through an overflow, the NaN guard, and half-precision evaluation against fp32."""

from __future__ import annotations

import pytest
import torch

from hisf.engine import NanGuard, NonFiniteLossError, Precision, compile_losses, resolve_precision, train_step
from tests.gpu.helpers import assert_same_update, cuda_env, tiny_batch, tiny_setup

pytestmark = pytest.mark.gpu


def _run(model, states, precision, images, labels, device, steps=3):
    env = cuda_env(device)
    return [train_step(model, images, labels, states, precision, env)[0] for _ in range(steps)]


@pytest.mark.parametrize("precision,storage,rel", [
    ("fp16", "fp32", 0.05), ("fp16", "fp16", 0.1), ("bf16", "fp32", 0.15), ("bf16", "bf16", 0.25),
])
def test_mixed_precision_step_matches_fp32(cuda, deterministic, precision, storage, rel):
    """Three SGD steps of hisf under autocast (fp16 with GradScaler, or bf16), backbone stored in fp32 or in
    half: the losses agree with fp32's and every trainable tensor moves the way fp32 moves it."""
    images, labels = tiny_batch(cuda)
    model, states = tiny_setup("hisf", cuda)
    before = model.trainable_state_dict()
    ref = _run(model, states, resolve_precision("fp32", cuda), images, labels, cuda)
    want = model.trainable_state_dict()

    model, states = tiny_setup("hisf", cuda, storage=storage)
    prec = resolve_precision(precision, cuda)
    assert prec.name == precision and prec.grad_scaling == (precision == "fp16")
    if prec.grad_scaling:
        # The default first scale (2^16) overflows a few steps by design (the scaler then backs off); start
        # where it would settle, so every step counts.
        states[0].scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    got = _run(model, states, prec, images, labels, cuda)
    assert [r.skipped for r in got] == [False] * 3
    for r, w in zip(got, ref):
        assert r.losses["loss"] == pytest.approx(w.losses["loss"], rel=rel / 5)
        assert r.losses["loss_cls"] == pytest.approx(w.losses["loss_cls"], rel=rel / 5)
    assert got[0].losses["loss"] != ref[0].losses["loss"], "autocast changed nothing: not a half-precision run"
    assert_same_update(before, model.trainable_state_dict(), want, rel)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_matches_eager_through_an_overflow(cuda, mode):
    """Six fp16 steps; the fourth overflows (scale 3e38) and is skipped by the scaler: the compiled (and
    CUDA-graphed) step skips the same step and matches eager's losses and weights."""
    from torch._dynamo.utils import counters

    images, labels = tiny_batch(cuda)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model, states = tiny_setup("hisf", cuda)
        before = model.trainable_state_dict()
        if compiled:
            compile_losses(model, mode)
        prec = Precision("fp16", "cuda", torch.float16, grad_scaling=True)
        scaler = states[0].scaler = torch.amp.GradScaler("cuda", init_scale=1024.0, growth_interval=10_000)
        results = []
        for step in range(6):
            if step == 3:
                scaler.update(new_scale=3e38)  # loss (> 3 with 50 classes) x 3e38 overflows float32
            results.append(train_step(model, images, labels, states, prec, cuda_env(cuda))[0])
            if step == 3:
                assert scaler.get_scale() == pytest.approx(1.5e38)  # backed off once: the overflow was seen
                scaler.update(new_scale=1024.0)
        runs[compiled] = (results, model.trainable_state_dict())
        if compiled:
            assert counters["frames"]["ok"] > 0 and not counters["graph_break"], (dict(counters["frames"]), dict(counters["graph_break"]))
            if mode == "reduce-overhead":
                assert not counters["inductor"]["cudagraph_skips"], "CUDA graphs were skipped: the step ran without them"
    (eager, eager_w), (comp, comp_w) = runs[False], runs[True]
    assert [r.skipped for r in eager] == [r.skipped for r in comp] == [False, False, False, True, False, False]
    assert all(r.finite for r in eager + comp)
    for e, c in zip(eager, comp):
        for k in ("loss", "loss_cls", "loss_le", "loss_sa"):
            assert c.losses[k] == pytest.approx(e.losses[k], rel=5e-3, abs=1e-5), k
    assert_same_update(before, comp_w, eager_w, 0.05)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_nonfinite_loss_is_skipped_on_cuda_and_the_guard_stops(cuda, precision):
    model, states = tiny_setup("hisf", cuda)
    with torch.no_grad():
        model.param_groups()["prompts"][0].view(-1)[0] = float("nan")
    before = model.trainable_state_dict()
    prec = resolve_precision(precision, cuda)
    if prec.grad_scaling:
        states[0].scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    images, labels = tiny_batch(cuda)
    guard = NanGuard(3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss for 3 steps in a row"):
        for step in range(1, 4):
            (res,) = train_step(model, images, labels, states, prec, cuda_env(cuda))
            assert res.skipped and not res.finite, res
            for k, v in model.trainable_state_dict().items():
                torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
            guard.update(res.finite, step, res.losses)
    if states[0].scaler is not None:
        assert states[0].scaler.get_scale() == pytest.approx(1024.0 / 8)  # three non-finite steps, three back-offs


def test_half_precision_evaluation_matches_fp32(cuda, demo_root):
    """Logits over the demo test split with the backbone stored in fp16 under autocast agree with fp32; every
    prediction whose fp32 top-2 margin exceeds twice the tolerance is the same, and so is the accuracy up to
    the close calls."""
    from data_shards import make_loader, open_dataset
    from hisf.engine.evaluation import accuracy

    sub = open_dataset(demo_root / "demo").select("test", shots=None, seed=1, classes="all")
    logits, models = {}, {}
    for storage in ("fp32", "fp16"):
        model, _ = tiny_setup("hisf", cuda, storage=storage, n_classes=len(sub.classnames))
        model.set_classnames(sub.classnames)
        model.eval()
        backbone = model.backbone
        loader = make_loader(sub, train=False, batch_size=16, image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
        prec = resolve_precision(storage, cuda)
        with torch.no_grad(), prec.autocast():
            logits[storage] = torch.cat([model(x.to(cuda))[0].float() for x, _ in loader])  # the one member
        models[storage] = (model, loader, prec)
    l32, l16 = logits["fp32"], logits["fp16"]
    assert l32.shape == (len(sub), len(sub.classnames)) and not torch.equal(l32, l16)
    atol = 0.05
    torch.testing.assert_close(l16, l32, rtol=1e-2, atol=atol)
    top2 = l32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (atol + 1e-2 * top2[:, 0].abs())
    assert torch.equal(l16.argmax(-1)[clear], l32.argmax(-1)[clear])
    acc = {s: accuracy(m, loader, cuda_env(cuda), prec.autocast)[0] for s, (m, loader, prec) in models.items()}
    assert abs(acc["fp16"] - acc["fp32"]) <= 100.0 * int((~clear).sum()) / len(sub)
