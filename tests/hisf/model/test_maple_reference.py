"""Our `maple` logits after importing a MaPLe-format checkpoint equal MaPLe's reference formulation."""

from __future__ import annotations

import pytest
import torch

from benchmarks.maple_reference import ReferenceMaPLe, reference_from_backbone
from hisf.config import MethodConfig
from hisf.model.maple_import import MapleImportError, import_maple_prompts
from hisf.model.methods import build_method


def maple_checkpoint(depth: int, n_ctx: int, tw: int, vw: int, n_cls: int, seed: int = 3) -> dict:
    """A Dassl `model.pth.tar-N`-shaped dict with MaPLe's real key names (values random)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "prompt_learner.ctx": torch.randn(n_ctx, tw, generator=g) * 0.5,
        "prompt_learner.proj.weight": torch.randn(vw, tw, generator=g) * 0.2,
        "prompt_learner.proj.bias": torch.randn(vw, generator=g) * 0.1,
        # Buffers MaPLe saves and rebuilds from the class names; the importer must ignore them.
        "prompt_learner.token_prefix": torch.randn(n_cls, 1, tw, generator=g),
        "prompt_learner.token_suffix": torch.randn(n_cls, 77 - 1 - n_ctx, tw, generator=g),
    }
    for i in range(depth - 1):
        sd[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n_ctx, tw, generator=g) * 0.5
        sd[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(vw, tw, generator=g) * 0.2
        sd[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(vw, generator=g) * 0.1
    return {"state_dict": sd, "epoch": 5, "optimizer": None, "scheduler": None}


@pytest.mark.parametrize("depth", [1, 3])
def test_maple_logits_equal_reference(backbone, tiny_ckpt, images, tmp_path, depth, classes):
    tw, vw = backbone.text_width, backbone.vision_width
    ckpt = maple_checkpoint(depth, 2, tw, vw, len(classes))
    path = tmp_path / "model.pth.tar-5"
    torch.save(ckpt, path)

    model = build_method(MethodConfig(name="maple", depth=depth), backbone, classes)
    before = model(images)[0]  # the one member's [B, C]
    import_maple_prompts(model, path)
    ours = model(images)[0]

    clip_sd = torch.load(tiny_ckpt, weights_only=True)
    ref = ReferenceMaPLe(clip_sd, ckpt["state_dict"], classes, backbone.tokenizer, text_heads=4, vision_heads=4)
    with torch.no_grad():
        theirs = ref(images)
    with torch.no_grad():
        torch.testing.assert_close(reference_from_backbone(backbone, ckpt["state_dict"], classes)(images), theirs, atol=0, rtol=0)
    assert ours.shape == (4, len(classes))
    assert (before - ours).abs().max() > 1e-3  # the import changed the prompts
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The comparison is sensitive to the text-side prompts too (layer 0 and the deeper ones).
    with torch.no_grad():
        for p in [ref.ctx, *ref.compound_prompts_text]:
            p.add_(torch.randn_like(p))
            assert (ref(images) - ours).abs().max() > 1e-3


def test_maple_checkpoint_errors(backbone, tmp_path, classes):
    tw, vw = backbone.text_width, backbone.vision_width
    model = build_method(MethodConfig(name="maple", depth=3), backbone, classes)
    good = model.trainable_state_dict()

    ckpt = maple_checkpoint(3, 2, tw, vw, 3)
    del ckpt["state_dict"]["prompt_learner.compound_prompt_projections.1.bias"]
    with pytest.raises(MapleImportError, match=r"missing keys \['prompt_learner.compound_prompt_projections.1.bias'\]"):
        import_maple_prompts(model, ckpt)

    ckpt = maple_checkpoint(3, 2, tw, vw, 3)
    ckpt["state_dict"]["prompt_learner.proj.weight"] = torch.zeros(vw + 1, tw)
    with pytest.raises(MapleImportError, match=r"prompt_learner.proj.weight.*shape \(65, 64\); expected \(64, 64\)"):
        import_maple_prompts(model, ckpt)

    with pytest.raises(MapleImportError, match="depth 2"):
        import_maple_prompts(model, maple_checkpoint(2, 2, tw, vw, 3))
    with pytest.raises(MapleImportError, match="shape"):
        import_maple_prompts(model, maple_checkpoint(3, 4, tw, vw, 3))
    with pytest.raises(MapleImportError, match="not found"):
        import_maple_prompts(model, tmp_path / "missing.pth.tar-5")
    # A failed import leaves the model's prompts untouched.
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, good[k]), k


def test_reference_moves_every_tensor_with_to(backbone, classes):
    """`.to(device)` must carry the causal mask too (a plain attribute stayed on the CPU and broke CUDA runs)."""
    ckpt = maple_checkpoint(3, 2, backbone.text_width, backbone.vision_width, len(classes))
    ref = reference_from_backbone(backbone, ckpt["state_dict"], classes).to(torch.float64)
    block = ref.transformer.resblocks[0]
    assert "attn_mask" in dict(block.named_buffers())
    assert "transformer.resblocks.0.attn_mask" not in ref.state_dict()  # rebuilt, not saved
    # No module keeps a tensor outside its parameters and buffers (what .to() would leave behind).
    stray = [f"{name}.{k}" for name, m in ref.named_modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    assert stray == []
    assert block.attn_mask.dtype == torch.float64 and block.attn_mask[0, 1] == float("-inf")
    ref = ref.to("meta")
    assert {b.device.type for b in ref.buffers()} == {"meta"}


def test_maple_fp16_storage_keeps_layernorms_float32_and_trains(backbone, classes, images):
    """MaPLe's `PREC: fp16` storage (OpenAI's convert_weights + its prompt learner's dtypes) runs forward and
    backward (here on the CPU, as in `gpu_check.sh --cpu-smoke`) and gives the fp32 logits up to half precision;
    a blanket `.half()` puts the LayerNorms in half and fails next to their float32 inputs."""
    import torch.nn.functional as F

    from benchmarks.maple_reference import to_maple_fp16

    ckpt = maple_checkpoint(3, 2, backbone.text_width, backbone.vision_width, len(classes))
    ref = reference_from_backbone(backbone, ckpt["state_dict"], classes)
    with torch.no_grad():
        want = ref(images)
    half = to_maple_fp16(reference_from_backbone(backbone, ckpt["state_dict"], classes))
    dtypes = {name: p.dtype for name, p in half.named_parameters()}
    fp32 = {n for n, d in dtypes.items() if d == torch.float32}
    assert all(dtypes[n] == torch.float32 for n in dtypes if ".ln_" in n or n.startswith(("ln_final", "visual.ln_")))
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding", "visual.class_embedding",
            "logit_scale", "compound_prompts_text.0", "compound_prompt_projections.1.weight"} <= fp32
    for name in ("visual.conv1.weight", "visual.proj", "text_projection", "transformer.resblocks.0.attn.in_proj_weight",
                 "transformer.resblocks.2.attn.out_proj.weight", "visual.transformer.resblocks.1.mlp.c_fc.weight",
                 "ctx", "proj.weight", "proj.bias"):
        assert dtypes[name] == torch.float16, name
    assert half.dtype == torch.float16 and half.token_prefix.dtype == torch.float16
    got = half(images)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * float(want.abs().max()))
    loss = F.cross_entropy(got, torch.tensor([0, 1, 2, 1]))
    loss.backward()
    assert half.ctx.grad.dtype == torch.float16 and half.compound_prompts_text[0].grad.dtype == torch.float32
    assert torch.isfinite(half.ctx.grad).all() and half.ctx.grad.abs().sum() > 0
    # A new class set (MaPLe: a new prompt learner over the same parameters) keeps the storage.
    half.set_classnames([*classes, "sea turtle"], backbone.tokenizer)
    assert half(images).shape == (4, 4) and half.token_suffix.dtype == torch.float16

    blanket = reference_from_backbone(backbone, ckpt["state_dict"], classes).half()
    with pytest.raises(RuntimeError, match=r"(?i)dtype|scalar type"):
        blanket(images)
