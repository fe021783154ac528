"""A few optimisation steps on a small separable task lower the loss for every trainable method; losses match their equations."""

from __future__ import annotations

import pytest
import torch

from hisf.config import MethodConfig
from hisf.model.losses import cls_loss, label_embedding_loss, semantic_alignment_loss, total_loss
from hisf.model.methods import build_method


def separable_task(n_per_class: int = 6):
    """Three classes of 32x32 images: a bright colour channel per class plus noise."""
    g = torch.Generator().manual_seed(11)
    images, labels = [], []
    for c in range(3):
        x = torch.randn(n_per_class, 3, 32, 32, generator=g) * 0.3
        x[:, c] += 1.5
        images.append(x)
        labels += [c] * n_per_class
    return torch.cat(images), torch.tensor(labels)


@pytest.mark.parametrize("method", ["zeroshot", "coop", "maple", "hisf"])
def test_steps_lower_the_loss(backbone, classes, method):
    torch.manual_seed(0)
    images, labels = separable_task()
    model = build_method(MethodConfig(name=method, depth=2), backbone, classes)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        first = model.forward_losses(images, labels)
    if method == "zeroshot":
        assert params == [] and not first["loss"].requires_grad
        return
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(12):
        opt.zero_grad()
        out = model.forward_losses(images, labels)
        out["loss"].sum().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = model.forward_losses(images, labels)
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    assert last["loss_cls"] < first["loss_cls"]
    acc = (last["logits"][0].argmax(-1) == labels).float().mean()
    assert acc == 1.0


def test_losses_match_their_equations():
    """Each loss per member of a group ([K] values from [K, ...] inputs), by its equation member by member."""
    g = torch.Generator().manual_seed(5)
    k = 2
    finals = [torch.randn(k, 2, 8, generator=g) for _ in range(3)]  # P_final^l [K, n_ctx, W] for |J| = 3 layers
    means = torch.randn(k, 4, 8, generator=g)  # ē_c per member for C = 4 classes
    expected = torch.stack([sum((p[m].mean(0) - means[m, c]).norm() for p in finals for c in range(4)) / 12
                            for m in range(k)])
    torch.testing.assert_close(label_embedding_loss(finals, means), expected)

    img = torch.nn.functional.normalize(torch.randn(k, 5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(k, 4, 8, generator=g), dim=-1)
    y = torch.tensor([[0, 3, 3, 1, 2], [1, 1, 0, 2, 3]])
    expected = torch.stack([sum(1 - torch.dot(img[m, i], txt[m, y[m, i]]) for i in range(5)) / 5 for m in range(k)])
    torch.testing.assert_close(semantic_alignment_loss(img, txt, y), expected)

    logits = torch.randn(k, 5, 4, generator=g)
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[m], y[m]) for m in range(k)])
    torch.testing.assert_close(cls_loss(logits, y), expected)

    a, b, c = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert total_loss(a, b, c, 0.5, 2.0).item() == 1.0 + 1.0 + 6.0
    assert total_loss(a, b, c, 0.0, 0.0).item() == 1.0
    assert total_loss(a, b, c, 1.0, 1.0, use_cls=False).item() == 5.0
    # A zero weight keeps its term out: a non-finite term it weighs cannot reach the total.
    assert total_loss(a, torch.tensor(float("nan")), c, 0.0, 1.0).item() == 4.0
    weights = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(total_loss(a.expand(2), b.expand(2), c.expand(2), weights, weights),
                               torch.tensor([1.0 + 1.0 + 1.5, 1.0 + 4.0 + 6.0]))
