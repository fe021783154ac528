"""torch.compile in a reused process (a Tune actor): every trial's class set compiles, finished models are freed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hisf.config import BackboneConfig, MethodConfig
from hisf.engine import compile_losses, compile_stats, release_compiled
from hisf.model.backbone import load_backbone
from hisf.model.methods import build_method

TINY = BackboneConfig(name="hisf-tiny", pretrained=None, precision="fp32")
NAMES = ["cat", "sea lion", "fire truck red", "dog", "a b c d e", "tree", "x y", "lorry big", "q", "house cat w",
         "r s t u v w"]


def _trial_step(backbone, k: int):
    """What one trial does with compile on: a model over k classes, compiled, one forward + backward."""
    model = build_method(MethodConfig(name="hisf", depth=2), backbone, NAMES[:k]).train()
    compile_losses(model, backend="eager")  # Dynamo's guards and cache are what matter; eager keeps it fast
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    model.forward_losses(images, torch.tensor([0, 1]))["loss"].backward()
    return model


@pytest.mark.slow  # about a minute on a busy 2-core machine: six compiles of a tiny CLIP
@torch._dynamo.config.patch(recompile_limit=2)
def test_every_class_set_compiles_when_each_trial_releases():
    # Every class set recompiles forward_losses (its buffers' shapes and the truncation length are guarded);
    # Dynamo's cache is per code object, so trials in one process share it and the (limit+1)-th class set
    # would run eager for the rest of the process. The limit is lowered from 8 to 2 to keep the test short.
    torch.manual_seed(0)
    backbone = load_backbone(TINY)
    release_compiled(None)
    start = compile_stats()
    for k in range(2, 6):  # four distinct class sets, twice the limit
        model = _trial_step(backbone, k)
        release_compiled(model)
        del model
    stats = compile_stats()
    assert stats["compiled_frames"] - start["compiled_frames"] == 4
    assert stats["eager_fallbacks"] == start["eager_fallbacks"]

    # Without the per-trial release the same class sets hit the limit, and the counter the engine reports
    # from sees it (the frame then runs eager without being counted again).
    models = [_trial_step(backbone, k) for k in range(2, 6)]
    after = compile_stats()
    assert after["compiled_frames"] - stats["compiled_frames"] == 2
    assert after["eager_fallbacks"] - stats["eager_fallbacks"] == 1
    for m in models:
        release_compiled(m)


def test_release_breaks_the_compiled_model_cycle():
    torch.manual_seed(0)
    backbone = load_backbone(TINY)
    gc.collect()
    gc.disable()  # only reference counting: what frees a model right away, without waiting for a cyclic GC
    try:
        model = _trial_step(backbone, 3)
        ref = weakref.ref(model)
        del model
        assert ref() is not None  # the cycle model -> compiled forward_losses -> bound method -> model
        release_compiled(ref())
        assert ref() is None
    finally:
        gc.enable()
