"""The backbone loads and freezes, and our layer-by-layer encoders equal open_clip's without prompts."""

from __future__ import annotations

import pytest
import torch

from hisf.config import BackboneConfig, ConfigError
from hisf.model.backbone import BackboneError, load_backbone
from hisf.model.encoders import encode_image, encode_text, text_length


def test_encoders_equal_open_clip(backbone, images):
    ids = backbone.tokenize(["a photo of a dog.", "x", "an unusually long sentence about a red fox in snow"])
    with torch.no_grad():
        img_ours, img_ref = encode_image(backbone, images), backbone.model.encode_image(images)
        txt_full = encode_text(backbone, ids, truncate=False)
        txt_fast = encode_text(backbone, ids, truncate=True)
        txt_ref = backbone.model.encode_text(ids)
    assert img_ours.shape == (4, 64) and txt_ref.shape == (3, 64)
    assert img_ref.abs().max() > 0.1 and txt_ref.abs().max() > 0.1
    torch.testing.assert_close(img_ours, img_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt_full, txt_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt_fast, txt_ref, atol=1e-5, rtol=0)
    # the fast path ran 12 positions ([SOS] + 10 words + [EOS]), not 77
    assert text_length(backbone, ids) == 12


def test_backbone_is_frozen_and_described(backbone, tiny_ckpt):
    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    assert (backbone.text_width, backbone.vision_width, backbone.embed_dim) == (64, 64, 64)
    assert (backbone.text_layers, backbone.vision_layers, backbone.image_size) == (3, 3, 32)
    assert backbone.context_length == 77 and backbone.quick_gelu
    sd = torch.load(tiny_ckpt, weights_only=True)
    assert torch.equal(backbone.model.visual.conv1.weight, sd["visual.conv1.weight"])
    assert torch.equal(backbone.model.token_embedding.weight, sd["token_embedding.weight"])


def test_checkpoint_formats(tiny_cfg, tiny_ckpt, tmp_path, images):
    sd = torch.load(tiny_ckpt, weights_only=True)
    ref = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(tiny_ckpt)))
    # Dassl/DDP wrapping: {"state_dict": {"module.<key>": ...}}
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    # OpenAI's format carries metadata keys and implies QuickGELU even when the config says GELU.
    openai = tmp_path / "openai.pt"
    torch.save({**sd, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}, openai)
    gelu_cfg = {**tiny_cfg, "quick_gelu": False}
    bb_wrapped = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(wrapped)))
    bb_openai = load_backbone(BackboneConfig(name="tiny", pretrained=str(openai), model_cfg=gelu_cfg))
    bb_gelu = load_backbone(BackboneConfig(name="tiny", pretrained=str(tiny_ckpt), model_cfg=gelu_cfg))
    with torch.no_grad():
        f_ref = ref.model.encode_image(images)
        torch.testing.assert_close(bb_wrapped.model.encode_image(images), f_ref, atol=0, rtol=0)
        torch.testing.assert_close(bb_openai.model.encode_image(images), f_ref, atol=0, rtol=0)
        assert bb_openai.quick_gelu and not bb_gelu.quick_gelu
        assert (bb_gelu.model.encode_image(images) - f_ref).abs().max() > 1e-4


def test_half_precision_storage(tiny_ckpt, images):
    ids = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=None)).tokenize(["a photo of a dog.", "cat"])
    ref = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(tiny_ckpt)))
    for precision, tol in (("fp16", 2e-2), ("bf16", 8e-2)):
        bb = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(tiny_ckpt), precision=precision))
        assert bb.model.visual.conv1.weight.dtype == bb.dtype != torch.float32
        with torch.no_grad():
            img, txt = encode_image(bb, images), encode_text(bb, ids)
            img_ref, txt_ref = encode_image(ref, images), encode_text(ref, ids)
        assert img.dtype == torch.float32
        torch.testing.assert_close(img, img_ref, atol=tol * img_ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(txt, txt_ref, atol=tol * txt_ref.abs().max().item(), rtol=0)


def test_bad_backbones(tiny_cfg, tiny_ckpt, tmp_path):
    with pytest.raises(BackboneError, match=r"unknown model 'ViT-Q-99'.*hisf-tiny"):
        load_backbone(BackboneConfig(name="ViT-Q-99", pretrained=None))
    with pytest.raises(BackboneError, match=r"'no-such-tag' is neither a file nor a pretrained tag of 'ViT-B-16'.*openai"):
        load_backbone(BackboneConfig(name="ViT-B-16", pretrained="no-such-tag"))
    with pytest.raises(BackboneError, match="ResNet"):
        load_backbone(BackboneConfig(name="RN50", pretrained=None))
    with pytest.raises(ConfigError, match="backbone.precision"):
        load_backbone(BackboneConfig(name="hisf-tiny", pretrained=None, precision="fp8"))
    sd = torch.load(tiny_ckpt, weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in sd.items() if k != "ln_final.weight"}, bad)
    with pytest.raises(BackboneError, match=r"missing keys \['ln_final.weight'\]"):
        load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(bad)))
    torch.save({**sd, "ln_final.bias": torch.zeros(65)}, bad)
    with pytest.raises(BackboneError, match=r"key 'ln_final.bias' has shape \(65,\); expected \(64,\)"):
        load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(bad)))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(BackboneError, match=r"backbone.pretrained: .*junk.pt: not a checkpoint we load"):
        load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(tmp_path / "junk.pt")))
