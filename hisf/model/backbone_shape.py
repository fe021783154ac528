"""A backbone read from its open_clip model config, without weights or a model: the config, its shape, what fits it.

Spec validation calls `backbone_shape` and `check_fits` for every trial config before Ray starts, so a
prompt depth beyond the model's layers, an n_ctx beyond its context length or fusion heads that do not
divide its width fail in milliseconds, not in every retry of a trial. Building the method on the loaded
backbone (hisf/model/prompts.py, prompt_model.py, fusion.py, hicropl_modules.py) refuses the same settings
with the same key; tests/hisf/model/test_backbone_shape.py holds the two to each other. Importing this module
costs no torch; open_clip is imported only for a name that is not one of ours.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hisf.config import BackboneConfig, ConfigError, MethodConfig

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


class BackboneError(ConfigError):
    """A backbone name, checkpoint or model config is not usable; the message names it. A ConfigError: it
    fails the same way in every retry, so a trial that meets it fails at once."""


def available_model_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def resolve_model_cfg(cfg: BackboneConfig) -> dict[str, Any]:
    """The open_clip model config dict for `cfg`: explicit dict, one of ours, or open_clip's built-in."""
    if cfg.model_cfg is not None:
        model_cfg = copy.deepcopy(dict(cfg.model_cfg))
    elif (MODEL_CONFIG_DIR / f"{cfg.name}.json").is_file():
        model_cfg = json.loads((MODEL_CONFIG_DIR / f"{cfg.name}.json").read_text())
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(cfg.name)
        if model_cfg is None:
            vits = [m for m in open_clip.list_models() if m.startswith("ViT")]
            raise BackboneError(
                f"backbone.name: unknown model {cfg.name!r}; expected an open_clip ViT "
                f"({', '.join(vits[:8])}, ...) or one of hisf/model/model_configs: {available_model_configs()}"
            )
        model_cfg = copy.deepcopy(model_cfg)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise BackboneError(f"backbone.model_cfg: missing key {key!r} in the config of {cfg.name!r}")
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    unsupported = [k for k in ("timm_model_name",) if vision.get(k)] + [k for k in ("hf_model_name",) if text.get(k)]
    if unsupported or model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg:
        raise BackboneError(
            f"backbone.name: {cfg.name!r} is not a plain CLIP ViT (found {unsupported or 'custom_text/multimodal_cfg'}); "
            "prompt injection needs open_clip's own VisionTransformer and text Transformer"
        )
    if isinstance(vision.get("layers"), (list, tuple)):
        raise BackboneError(f"backbone.name: {cfg.name!r} has a ResNet vision tower; expected a ViT")
    return model_cfg


@dataclass(frozen=True)
class BackboneShape:
    """The facts prompt methods depend on; the same names as on a loaded `Backbone`."""

    label: str  # how messages name the backbone: "backbone 'ViT-B-16'" or "backbone.model_cfg"
    text_layers: int
    vision_layers: int
    text_width: int
    vision_width: int
    context_length: int

    @property
    def layers(self) -> int:
        """Layers a prompt layer index may name: both towers take prompts at the same depth."""
        return min(self.text_layers, self.vision_layers)


def backbone_shape(cfg: BackboneConfig) -> BackboneShape:
    """The shape `load_backbone(cfg)` would build, read from the model config; raises BackboneError."""
    model_cfg = None if cfg.model_cfg is None else json.dumps(cfg.model_cfg, sort_keys=True, default=str)
    return _shape(cfg.name, model_cfg)


@functools.lru_cache(maxsize=64)
def _shape(name: str, model_cfg_json: str | None) -> BackboneShape:
    model_cfg = None if model_cfg_json is None else json.loads(model_cfg_json)
    resolved = resolve_model_cfg(BackboneConfig(name=name, pretrained=None, model_cfg=model_cfg))
    label = "backbone.model_cfg" if model_cfg is not None else f"backbone {name!r}"
    text = _tower(resolved["text_cfg"], "text_cfg", ("layers", "width", "context_length"), label)
    vision = _tower(resolved["vision_cfg"], "vision_cfg", ("layers", "width"), label)
    return BackboneShape(label, text_layers=text["layers"], vision_layers=vision["layers"], text_width=text["width"],
                         vision_width=vision["width"], context_length=text["context_length"])


def _tower(section: Any, where: str, keys: tuple[str, ...], label: str) -> dict[str, int]:
    """The tower's integers; a key the config leaves out takes open_clip's default (CLIPTextCfg/CLIPVisionCfg)."""
    if not isinstance(section, dict):
        raise BackboneError(f"{label}: {where} should be a mapping, got {section!r}")
    missing = [k for k in keys if k not in section]
    defaults: dict[str, Any] = {}
    if missing:
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        defaults = vars((CLIPTextCfg if where == "text_cfg" else CLIPVisionCfg)())
    out = {}
    for k in keys:
        v = section.get(k, defaults.get(k))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BackboneError(f"{label}: {where}.{k} should be a positive integer, got {v!r}")
        out[k] = v
    return out


def check_fits(method: MethodConfig, shape: BackboneShape, path: str = "method") -> None:
    """Raise ConfigError (naming `path.key` and the backbone) when `method`'s prompts do not fit `shape`.

    What each method reads: zeroshot nothing; coop n_ctx; maple and hisf n_ctx and the prompt layers (hisf
    with SF also the fusion heads, over the text width); hicropl n_ctx, layers, LKP and mapper heads (over both
    widths). The rest of a method config is checked by `MethodConfig.validate` on its own."""
    if method.name == "zeroshot":
        return
    from hisf.model.facts import METHODS

    n_ctx = method.n_ctx if method.n_ctx is not None else METHODS[method.name].n_ctx
    limit = shape.context_length - 4  # [SOS] + n_ctx + at least one name token + "." + [EOS]
    if not 1 <= n_ctx <= limit:
        raise ConfigError(f"{path}.n_ctx: {n_ctx} does not fit the context length {shape.context_length} of "
                          f"{shape.label}; expected 1..{limit}")
    if method.name == "coop":
        return  # CoOp prompts layer 0 only
    n = shape.layers
    if method.layers is None and method.depth > n:
        raise ConfigError(f"{path}.depth: {method.depth} exceeds the {n} layer{'s' * (n != 1)} of {shape.label}; "
                          f"expected 1..{n}")
    outside = [layer for layer in method.prompt_layers if layer >= n]
    if outside:
        raise ConfigError(f"{path}.layers: prompt layers {list(method.prompt_layers)} outside the {n} "
                          f"layer{'s' * (n != 1)} of {shape.label}; expected indices in 0..{n - 1}")
    if method.name == "hisf" and method.sf:
        _heads(method.fusion_heads, {"text": shape.text_width}, f"{path}.fusion_heads", shape)
    if method.name == "hicropl":
        widths = {"text": shape.text_width, "vision": shape.vision_width}
        _heads(method.lkp_heads, widths, f"{path}.lkp_heads", shape)
        _heads(method.mapper_heads, widths, f"{path}.mapper_heads", shape)


def _heads(heads: int, widths: dict[str, int], key: str, shape: BackboneShape) -> None:
    for what, width in widths.items():
        if width % heads:
            raise ConfigError(f"{key}: {heads} heads do not divide the {what} width {width} of {shape.label}")
