"""HISF's two docs/method.md decisions: sf_zero_init (an untrained HISF is MaPLe) and le_detach (L_le moves prompts only)."""

from __future__ import annotations

import torch

from hisf.config import MethodConfig
from hisf.model.methods import build_method


def _build(backbone, classes, name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_method(MethodConfig(name=name, depth=2, **kw), backbone, classes)


def _maple_with_hisf_prompts(backbone, classes, hisf):
    # MaPLe's parameters are a subset of HISF's (P_s^l and W_v^l under the same names): copy them over.
    maple = _build(backbone, classes, "maple", seed=3)
    own = hisf.trainable_state_dict()
    maple.load_trainable_state_dict({k: own[k] for k in maple.trainable_state_dict()})
    return maple


def test_untrained_hisf_equals_untrained_maple(backbone, classes, images):
    hisf = _build(backbone, classes, "hisf")
    assert all(torch.count_nonzero(f.v.weight) == 0 for f in hisf.fusion)
    maple = _maple_with_hisf_prompts(backbone, classes, hisf)
    with torch.no_grad():
        a, b = hisf(images), maple(images)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert a.abs().max() > 1.0  # real logits, not a degenerate zero
    # With nn.Linear's init for W_v the attention term moves the prompts: HISF no longer starts at MaPLe.
    nonzero = _build(backbone, classes, "hisf", sf_zero_init=False)
    maple = _maple_with_hisf_prompts(backbone, classes, nonzero)
    with torch.no_grad():
        assert (nonzero(images) - maple(images)).abs().max() > 1e-3


def _le_only_grad(backbone, classes, images, labels, **kw):
    model = _build(backbone, classes, "hisf", cls_loss=False, lambda_sa=0.0, lambda_le=1.0, **kw)
    out = model.forward_losses(images, labels)
    assert out["loss"].shape == (1,) and out["loss"].item() == out["loss_le"].item() > 0
    out["loss"].backward()
    prompt_grad = model.prompts.shared[0].grad
    assert prompt_grad is not None and prompt_grad.abs().sum() > 0  # L_le always moves the prompts
    return model.label_embeddings.table.grad


def test_le_detach_stops_the_label_embedding_gradient(backbone, classes, images, labels):
    # Without SF, Ē reaches L_le only as the target ē_c: detached, E gets no gradient at all.
    assert _le_only_grad(backbone, classes, images, labels, sf=False) is None
    grad = _le_only_grad(backbone, classes, images, labels, sf=False, le_detach=False)
    assert grad is not None and grad.abs().sum() > 1e-4
    # With SF (W_v = 0 and the MLP's zero last layer at init), the fusion path adds nothing at step 0 either.
    grad = _le_only_grad(backbone, classes, images, labels)
    assert grad is not None and grad.abs().sum() == 0
    grad = _le_only_grad(backbone, classes, images, labels, le_detach=False)
    assert grad.abs().sum() > 1e-4
