"""Prompt placement (class texts, prompt layers) and Prompt Initialization (PI, paper eq. 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from hisf.config import ConfigError
from hisf.model.backbone import Backbone
from hisf.model.members import MemberInit, MemberLinear

MAPLE_TEMPLATE_END = "."


class PromptError(ConfigError):
    """A prompt setting does not fit the backbone (n_ctx, layers, class names); the message names it. A
    ConfigError: it fails the same way in every retry, so a trial that meets it fails at once."""


def clean_classnames(names: Sequence[str]) -> list[str]:
    """CoOp/MaPLe replace '_' by ' ' in class names; empty and duplicated lists are errors."""
    if isinstance(names, str) or names is None:
        raise PromptError(f"classnames: expected a list of class names, got {names!r}")
    cleaned = [str(n).replace("_", " ").strip() for n in names]
    if not cleaned:
        raise PromptError("classnames: the class list is empty; expected at least one class name")
    seen: dict[str, int] = {}
    for i, n in enumerate(cleaned):
        if not n:
            raise PromptError(f"classnames[{i}]: empty class name {names[i]!r}")
        if n in seen:
            raise PromptError(f"classnames: {names[i]!r} (index {i}) duplicates index {seen[n]}; class names must be unique")
        seen[n] = i
    return cleaned


def check_layers(layers: Sequence[int], n_layers: int, what: str = "method.layers") -> tuple[int, ...]:
    layers = tuple(sorted(layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise PromptError(f"{what}: prompt layers {list(layers)} outside the model; expected indices in 0..{n_layers - 1}")
    return layers


@dataclass(frozen=True)
class ClassTexts:
    """Tokenized class prompts `[SOS] prefix name . [EOS]` and where each class name's tokens sit."""

    ids: torch.Tensor  # [C, context_length] long
    name_start: int  # first name-token position (1 + prefix tokens)
    name_lengths: tuple[int, ...]  # m_c per class


def prefix_text(backbone: Backbone, n_ctx: int, ctx_init: str) -> tuple[str, torch.Tensor | None]:
    """The words whose first n_ctx token positions hold the layer-0 text prompt, and their embeddings.

    MaPLe/CoOp: with n_ctx <= the tokens of `ctx_init` the prompt starts from those tokens' embeddings
    ("a photo" of "a photo of a"); otherwise n_ctx placeholder words "X" and a N(0, 0.02) start.
    """
    init_ids = backbone.bpe(ctx_init) if ctx_init else []
    if ctx_init and n_ctx <= len(init_ids):
        return ctx_init, backbone.token_embeddings(init_ids[:n_ctx])
    return " ".join(["X"] * n_ctx), None


def tokenize_classes(backbone: Backbone, names: Sequence[str], prefix: str, n_ctx: int) -> ClassTexts:
    """Tokenize `f"{prefix} {name}."` per class, checking every prompt fits the context."""
    prefix_ids = backbone.bpe(prefix) if prefix else []
    end_ids = backbone.bpe(MAPLE_TEMPLATE_END)
    texts, lengths = [], []
    for name in names:
        name_ids = backbone.bpe(name)
        full = backbone.bpe(f"{prefix} {name}{MAPLE_TEMPLATE_END}" if prefix else f"{name}{MAPLE_TEMPLATE_END}")
        if full != prefix_ids + name_ids + end_ids:
            raise PromptError(
                f"classnames: {name!r} does not tokenize on its own as inside {prefix!r} + name + '.'; "
                "rename the class (trailing punctuation merges with the final '.')"
            )
        if len(full) + 2 > backbone.context_length:
            raise PromptError(
                f"method.n_ctx: {n_ctx} prompt tokens with class {name!r} need {len(full) + 2} token positions; "
                f"the backbone's context length is {backbone.context_length}"
            )
        texts.append(f"{prefix} {name}{MAPLE_TEMPLATE_END}" if prefix else f"{name}{MAPLE_TEMPLATE_END}")
        lengths.append(len(name_ids))
    ids = backbone.tokenize(texts).to(backbone.device)
    return ClassTexts(ids=ids, name_start=1 + len(prefix_ids), name_lengths=tuple(lengths))


def check_n_ctx(n_ctx: int, backbone: Backbone) -> None:
    # [SOS] + n_ctx + at least one name token + "." + [EOS]
    if n_ctx < 1 or n_ctx + 4 > backbone.context_length:
        raise PromptError(
            f"method.n_ctx: {n_ctx} does not fit; expected 1..{backbone.context_length - 4} "
            f"for the backbone's context length {backbone.context_length}"
        )


class MultiModalPrompts(nn.Module):
    """Per prompt layer l in J and member k: text prompts P_t^l [K, n_ctx, Wt] and vision prompts P_v^l [K, n_ctx, Wv].

    coupled (PI, eq. 2): one shared P_s^l, P_t^l = W_t^l P_s^l, P_v^l = W_v^l P_s^l. `text_map=False` is
    MaPLe (W_t = identity, only W_v learned). coupled=False ("w/o PI"): independent P_t^l and P_v^l (with
    SF on, the fusion acts on P_t^l, the text-width prompt). CoOp: coupled=False, vision=False, J = {0}.
    Layer 0's text-side prompt starts from `token_init` (the ctx_init token embeddings), deeper ones N(0, 0.02).
    Every tensor carries the member axis first (hisf/model/members.py).
    """

    def __init__(
        self,
        init: MemberInit,
        layers: Sequence[int],
        n_ctx: int,
        text_width: int,
        vision_width: int,
        token_init: torch.Tensor | None,
        coupled: bool = True,
        text_map: bool = True,
        vision: bool = True,
    ):
        super().__init__()
        self.layers = tuple(layers)
        self.n_ctx = n_ctx
        self.coupled = coupled
        self.shared = nn.ParameterList()
        for l in self.layers:
            p = init.normal((n_ctx, text_width))
            if l == 0 and token_init is not None:
                p = init.same(token_init)
            self.shared.append(p)
        if coupled:
            # W_t^l starts as the identity so HISF starts where MaPLe starts; W_v^l is MaPLe's nn.Linear init.
            self.text_proj = (nn.ModuleList(MemberLinear(init, text_width, text_width, start="identity") for _ in self.layers)
                              if text_map else None)
            self.vision_proj = nn.ModuleList(MemberLinear(init, text_width, vision_width) for _ in self.layers)
            self.vision = None
        else:
            self.text_proj = None
            self.vision_proj = None
            # CoOp (vision=False) has text context only.
            self.vision = nn.ParameterList(init.normal((n_ctx, vision_width)) for _ in self.layers) if vision else None

    def forward(
        self, fuse: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list[torch.Tensor]]:
        """(text prompts by layer, vision prompts by layer, P_final^l by layer index) after fusion `fuse`."""
        text, vision, finals = {}, {}, []
        for i, l in enumerate(self.layers):
            p = self.shared[i]
            p = fuse(i, p) if fuse is not None else p
            finals.append(p)
            if self.coupled:
                text[l] = self.text_proj[i](p) if self.text_proj is not None else p
                vision[l] = self.vision_proj[i](p)
            else:
                text[l] = p
                if self.vision is not None:
                    vision[l] = self.vision[i]
        return text, vision, finals

    def groups(self) -> dict[str, list[nn.Parameter]]:
        prompts = list(self.shared) + (list(self.vision) if self.vision is not None else [])
        projections = []
        for mods in (self.text_proj, self.vision_proj):
            if mods is not None:
                projections += list(mods.parameters())
        return {"prompts": prompts, "projections": projections}
