"""A backbone's shape read from its model config (no weights, no model), and the method checks against it:
they refuse what building the method on that backbone refuses, with the same key, as a ConfigError."""

import pytest

from hisf.config import BackboneConfig, ConfigError, MethodConfig
from hisf.model.backbone_shape import BackboneShape, backbone_shape, check_fits

TINY = BackboneConfig(name="hisf-tiny", pretrained=None)


def test_shapes_of_ours_of_open_clips_and_of_an_explicit_model_cfg():
    assert backbone_shape(TINY) == BackboneShape("backbone 'hisf-tiny'", text_layers=3, vision_layers=3,
                                                 text_width=64, vision_width=64, context_length=77)
    b16 = backbone_shape(BackboneConfig(name="ViT-B-16"))
    assert (b16.text_layers, b16.vision_layers, b16.text_width, b16.vision_width, b16.context_length) == \
        (12, 12, 512, 768, 77)
    small = backbone_shape(BackboneConfig(name="ignored", model_cfg={
        "embed_dim": 8, "vision_cfg": {"layers": 2, "width": 16, "patch_size": 8, "image_size": 16},
        "text_cfg": {"layers": 1, "width": 8, "heads": 2, "context_length": 20}}))
    assert (small.label, small.layers, small.text_width, small.vision_width, small.context_length) == \
        ("backbone.model_cfg", 1, 8, 16, 20)


def test_unknown_and_unsupported_backbones_are_config_errors():
    from hisf.model.backbone import BackboneError

    assert issubclass(BackboneError, ConfigError)
    with pytest.raises(BackboneError, match="backbone.name: unknown model 'ViT-Q-99'"):
        backbone_shape(BackboneConfig(name="ViT-Q-99"))
    with pytest.raises(BackboneError, match="has a ResNet vision tower"):
        backbone_shape(BackboneConfig(name="RN50"))


BAD = [
    (MethodConfig(name="maple", depth=4), "method.depth"),
    (MethodConfig(name="hisf", layers=(1, 3)), "method.layers"),
    (MethodConfig(name="coop", n_ctx=74), "method.n_ctx"),
    (MethodConfig(name="hisf", depth=2, fusion_heads=3), "method.fusion_heads"),
    (MethodConfig(name="hicropl", depth=4, cross_layer=2), "method.depth"),
    (MethodConfig(name="hicropl", depth=3, cross_layer=2, lkp_heads=5), "method.lkp_heads"),
    (MethodConfig(name="hicropl", depth=3, cross_layer=2, mapper_heads=7), "method.mapper_heads"),
]
GOOD = [
    MethodConfig(name="zeroshot", depth=40, n_ctx=900),  # zero-shot CLIP has no prompts: nothing to fit
    MethodConfig(name="coop", depth=40, n_ctx=73),  # CoOp prompts layer 0 only: depth is not read
    MethodConfig(name="maple", depth=3, n_ctx=2),
    MethodConfig(name="hisf", layers=(0, 2), fusion_heads=64),
    MethodConfig(name="hisf", depth=3, sf=False, fusion_heads=3),  # no fusion module: its heads are not read
    MethodConfig(name="hicropl", depth=3, cross_layer=2, lkp_heads=4, mapper_heads=16),
]


@pytest.fixture(scope="module")
def tiny():
    from hisf.model.backbone import load_backbone

    return load_backbone(TINY)


@pytest.mark.parametrize("cfg, key", BAD)
def test_the_check_refuses_what_the_build_refuses_with_the_same_key(tiny, cfg, key):
    from hisf.model.methods import build_method

    with pytest.raises(ConfigError) as checked:
        check_fits(cfg, backbone_shape(TINY))
    assert str(checked.value).startswith(f"{key}: ") and "backbone 'hisf-tiny'" in str(checked.value)
    with pytest.raises(ConfigError) as built:  # a started trial fails at once: not retried
        build_method(cfg, tiny, ["a", "b", "c"])
    assert str(built.value).startswith(f"{key}: "), str(built.value)


@pytest.mark.parametrize("cfg", GOOD)
def test_what_the_check_accepts_builds(tiny, cfg):
    from hisf.model.methods import build_method

    check_fits(cfg, backbone_shape(TINY))
    assert build_method(cfg, tiny, ["a", "b", "c"]).classnames == ("a", "b", "c")


def test_the_shape_facts_match_the_built_model(tiny):
    shape = backbone_shape(TINY)
    assert (shape.text_layers, shape.vision_layers, shape.text_width, shape.vision_width, shape.context_length) == \
        (tiny.text_layers, tiny.vision_layers, tiny.text_width, tiny.vision_width, tiny.context_length)


def test_a_file_that_is_not_a_checkpoint_is_a_config_error(tmp_path):
    from hisf.model.backbone import load_backbone

    p = tmp_path / "notes.pt"
    p.write_text("these are my notes, not weights")
    with pytest.raises(ConfigError, match=f"^backbone.pretrained: .*{p}"):
        load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(p)))
