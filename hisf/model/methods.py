"""The method registry (name -> builder) and the baselines zeroshot, coop and maple; HISF and HiCroPL have their own modules.

What each method is (default n_ctx and depth, presets, the settings a run shows) is declared once in
`hisf/model/facts.py`, under the same names as the builders here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from hisf.config import ConfigError, MethodConfig
from hisf.model.backbone import Backbone
from hisf.model.hicropl import build_hicropl
from hisf.model.hisf import HisfModel, build_hisf
from hisf.model.members import MemberInit, check_members, member_seeds
from hisf.model.prompt_model import DEFAULT_TEMPLATE, Features, PromptModel, Prompts, prompt_layers, prompt_n_ctx
from hisf.model.prompts import MultiModalPrompts, PromptError, prefix_text

__all__ = ["BUILDERS", "DEFAULT_TEMPLATE", "Features", "HisfModel", "PromptModel", "Prompts", "ZeroShotModel",
           "build_method"]


class ZeroShotModel(PromptModel):
    """Frozen CLIP with the dataset's hand-written template: no prompts, no training."""

    def class_token_ids(self, names: tuple[str, ...], template: str | None) -> torch.Tensor:
        template = template or self.template
        if "{}" not in template:
            raise PromptError(f"template: {template!r} has no '{{}}' where the class name goes")
        self.template = template
        texts = [template.format(n) for n in names]
        too_long = [t for t in texts if len(self.backbone.bpe(t)) + 2 > self.backbone.context_length]
        if too_long:
            raise PromptError(f"classnames: prompt {too_long[0]!r} exceeds context length {self.backbone.context_length}")
        return self.backbone.tokenize(texts)


def build_zeroshot(cfg: MethodConfig, backbone: Backbone, init: MemberInit, members: Sequence[MethodConfig]) -> PromptModel:
    return ZeroShotModel(cfg, backbone, members=init.members)


def build_coop(cfg: MethodConfig, backbone: Backbone, init: MemberInit, members: Sequence[MethodConfig]) -> PromptModel:
    n_ctx = prompt_n_ctx(cfg, backbone)
    prefix, token_init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = MultiModalPrompts(init, (0,), n_ctx, backbone.text_width, backbone.vision_width, token_init, coupled=False,
                                vision=False)
    return PromptModel(cfg, backbone, n_ctx, (0,), prefix, prompts, members=init.members)


def build_maple(cfg: MethodConfig, backbone: Backbone, init: MemberInit, members: Sequence[MethodConfig]) -> PromptModel:
    n_ctx, layers = prompt_n_ctx(cfg, backbone), prompt_layers(cfg, backbone)
    prefix, token_init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = MultiModalPrompts(init, layers, n_ctx, backbone.text_width, backbone.vision_width, token_init, coupled=True,
                                text_map=False)
    return PromptModel(cfg, backbone, n_ctx, layers, prefix, prompts, members=init.members)


# A builder takes the group's structure config, the backbone, the members' initialisation and every member's config.
BUILDERS: dict[str, Callable[[MethodConfig, Backbone, MemberInit, Sequence[MethodConfig]], PromptModel]] = {
    "zeroshot": build_zeroshot,
    "coop": build_coop,
    "maple": build_maple,
    "hisf": build_hisf,
    "hicropl": build_hicropl,
}


def build_method(cfg: MethodConfig, backbone: Backbone, classnames: Sequence[str], template: str | None = None,
                 dataset: str | None = None, members: Sequence[MethodConfig] | None = None,
                 seeds: Sequence[int] | None = None) -> PromptModel:
    """Build method `cfg.name` on a frozen backbone over `classnames` (zeroshot reads `template`; HiCroPL's
    text teacher reads the descriptions of `dataset`, the catalogue key).

    `members`: the method configs of a fused group's members (default: `cfg` alone, a plain trial), equal to
    `cfg` outside the per-member keys (hisf.model.members.METHOD_MEMBER_KEYS); `seeds`: each member's
    initialisation seed (its trial seed; default: drawn from the global torch RNG)."""
    if cfg.name not in BUILDERS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r}; expected one of {sorted(BUILDERS)}")
    cfg.validate()
    members = tuple(members) if members is not None else (cfg,)
    check_members(cfg, members)
    seeds = list(seeds) if seeds is not None else member_seeds(len(members))
    if len(seeds) != len(members):
        raise ValueError(f"build_method: {len(seeds)} seeds for {len(members)} members")
    model = BUILDERS[cfg.name](cfg, backbone, MemberInit(seeds), members)
    model.to(backbone.device)
    model.set_classnames(classnames, template, dataset)
    return model
