"""The compiled step: no graph break in forward_losses, and a torch.compile'd tiny trial matches the eager one."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import tiny_trial, without_timing
from hisf.model.backbone import load_backbone
from hisf.config import BackboneConfig, MethodConfig
from hisf.model.encoders import text_length
from hisf.engine import TrialCallback, run_trial
from hisf.model.methods import build_method

TINY = BackboneConfig(name="hisf-tiny", pretrained=None, precision="fp32")


METHOD_KW = {"maple": {}, "hisf": {}, "hicropl": {"n_ctx": 4, "cross_layer": 1}}


@pytest.mark.parametrize("method", ["maple", "hisf", "hicropl"])
def test_forward_losses_is_one_graph(method):
    torch.manual_seed(0)
    backbone = load_backbone(TINY)
    cfg = MethodConfig(name=method, depth=3, **METHOD_KW[method])
    model = build_method(cfg, backbone, ["cat", "sea lion", "fire truck red"]).train()
    # The truncation length is a class-set constant, read once on the host when the class set is set.
    assert model.text_len == text_length(backbone, model.token_ids) < backbone.context_length
    images, labels = torch.randn(2, 3, backbone.image_size, backbone.image_size), torch.tensor([0, 2])
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model.forward_losses)(images, labels)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [r.reason for r in ex.break_reasons]
    model.set_classnames(["a", "b"])
    assert model.text_len == text_length(backbone, model.token_ids)


class _Start(TrialCallback):
    def on_trial_start(self, data):
        self.compile = data["compile"]


def test_compiled_trial_matches_eager(demo_root, tmp_path):
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        start = _Start()
        result = run_trial(tiny_trial(demo_root, tmp_path / str(compiled), train={"compile": compiled}), [start])
        assert start.compile == ("default" if compiled else "eager")  # what the trial's record says ran
        runs[compiled] = without_timing(result)
        frames = torch._dynamo.utils.counters["frames"]
        # Eager runs no dynamo frame; compiled, forward_losses was captured whole (no graph break).
        assert (frames["ok"] > 0) == compiled, dict(frames)
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    eager, compiled = runs[False], runs[True]
    assert eager.keys() == compiled.keys()
    # Two epochs of 3 SGD steps, then base/novel accuracy: the losses agree to fp32 reordering error, and
    # the accuracies (multiples of 100/18) exactly.
    for key in ("train/loss", "train/loss_cls", "train/loss_le", "train/loss_sa"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    for key in ("val_acc", "base_acc", "novel_acc", "hm", "skipped_steps", "trainable_params"):
        assert compiled[key] == eager[key], key


@pytest.mark.slow
def test_released_mapping_compiles_to_one_graph_and_matches_eager():
    """`mapping: released` writes its prompts in place (under no_grad) inside the forward. Its D visual prompt
    parameters share one storage, and aot_autograd cannot mutate aliased inputs, so the write-back runs eagerly:
    one break before the graph of the encoders and the loss; the compiled step leaves the same values and
    gradients as the eager one."""
    backbone = load_backbone(TINY)
    cfg = MethodConfig(name="hicropl", depth=3, n_ctx=4, cross_layer=1, mapping="released", released_storage="shared")
    images, labels = torch.randn(2, 3, backbone.image_size, backbone.image_size), torch.tensor([0, 2])

    def fresh():
        torch.manual_seed(0)
        return build_method(cfg, backbone, ["cat", "sea lion", "fire truck red"]).train()

    torch._dynamo.reset()
    ex = torch._dynamo.explain(fresh().forward_losses)(images, labels)
    assert (ex.graph_count, ex.graph_break_count) == (2, 1), [r.reason for r in ex.break_reasons]
    eager, compiled = fresh(), fresh()
    step = torch.compile(compiled.forward_losses)
    for _ in range(2):  # the second forward re-maps what the first wrote
        e, c = eager.forward_losses(images, labels), step(images, labels)
        for k in compiled.loss_terms:
            torch.testing.assert_close(c[k], e[k], atol=1e-5, rtol=1e-5)
        c["loss"].backward()
        e["loss"].backward()
        for (k, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
            if pe.requires_grad:
                torch.testing.assert_close(pc, pe, atol=1e-5, rtol=1e-5, msg=k)
                assert (pc.grad is None) == (pe.grad is None), k
                if pe.grad is not None:
                    torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=k)
