"""PromptModel: a frozen CLIP plus a method's prompt-side parameters; what differs per method lives in subclass hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hisf.config import MethodConfig
from hisf.model.backbone import Backbone
from hisf.model.encoders import encode_image, encode_text, text_length
from hisf.model.facts import METHODS, PARAM_GROUPS
from hisf.model.losses import cls_loss
from hisf.model.prompts import PromptError, check_layers, check_n_ctx, clean_classnames, tokenize_classes

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class Prompts:
    """What a method's prompt computation gives the encoders: prompts by layer, plus method data (`aux`)."""

    text: dict[int, torch.Tensor] = field(default_factory=dict)
    vision: dict[int, torch.Tensor] = field(default_factory=dict)
    aux: Any = None  # e.g. HISF's (P_final by layer, Ē) for L_le


@dataclass
class Features:
    """The features the logits are made of (normalised), and what a method's losses need besides them."""

    image: torch.Tensor  # [B, E]
    text: torch.Tensor  # [C, E]
    prompts: Prompts
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. HiCroPL's teacher features


class PromptModel(nn.Module):
    """A frozen CLIP plus a method's prompt-side parameters, over a class set that may change.

    Method-agnostic: a method is a subclass that overrides the hooks `compute_prompts` (prompts by layer),
    `text_token_embeds` (token embeddings of the class texts), `on_classnames` (per-class-set data),
    `mix_features` (features the logits use) and `losses` (the terms named in `loss_terms`, "loss" first).
    The base class is CoOp/MaPLe: prompts from `self.prompts`, loss = L_cls.

    The prompts depend on the class set at most, not on the image, so the text encoder runs once per class
    per forward; in eval mode without grad the text features are cached until a trainable parameter, the
    class set or the device changes (a method whose forward changes its own parameters sets
    `cache_text = False`).
    """

    loss_terms: tuple[str, ...] = ("loss", "loss_cls")
    cache_text: bool = True
    # True when a forward changes trainable parameters in place (HiCroPL's released mapping): the engine then
    # re-broadcasts rank 0's parameters after evaluation, where ranks run different numbers of forwards.
    forward_writes_params: bool = False

    def __init__(self, cfg: MethodConfig, backbone: Backbone, n_ctx: int = 0, layers: tuple[int, ...] = (),
                 prefix: str = "", prompts: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.clip = backbone.model  # a submodule so .to(device) moves it; frozen, never in the optimiser
        self.n_ctx = n_ctx
        self.layers = layers
        self.prefix = prefix
        self.prompts = prompts
        # Fast path: run only the token positions up to the longest class prompt's [EOS].
        self.truncate_text = True
        self.classnames: tuple[str, ...] = ()
        self.template = DEFAULT_TEMPLATE
        self.dataset: str | None = None
        self.register_buffer("token_ids", torch.zeros(0, backbone.context_length, dtype=torch.long), persistent=False)
        self.name_start = 0
        self.text_len = backbone.context_length  # positions up to the last [EOS], set with the class set
        self._classes_version = 0
        self._cache: tuple | None = None

    # ----- class set -----
    def set_classnames(self, names: Sequence[str], template: str | None = None, dataset: str | None = None) -> None:
        """Switch the class set; `dataset` (the catalogue key) is for methods with per-dataset data (HiCroPL)."""
        names = tuple(clean_classnames(names))
        ids = self.class_token_ids(names, template)
        # Read on the host once per class set, so the step itself never syncs (issue 2 item 8, issue 4).
        self.text_len = text_length(self.backbone, ids)
        self.token_ids = ids.to(self.clip.logit_scale.device)
        self.on_classnames(names, dataset)
        self.classnames = names
        self.dataset = dataset
        self._classes_version += 1
        self._cache = None

    def class_token_ids(self, names: tuple[str, ...], template: str | None) -> torch.Tensor:
        """[C, context_length] token ids of the class texts `[SOS] prefix name . [EOS]` (sets name_start)."""
        texts = tokenize_classes(self.backbone, names, self.prefix, self.n_ctx)
        self.name_start = texts.name_start
        return texts.ids

    def on_classnames(self, names: tuple[str, ...], dataset: str | None) -> None:
        """Hook: per-class-set data of the method (label embeddings, text teacher); called once per class set."""

    # ----- prompt-side computation (hooks) -----
    def compute_prompts(self) -> Prompts:
        """Hook: text and vision prompts by layer (no image input)."""
        if self.prompts is None:
            return Prompts()
        text, vision, finals = self.prompts()
        return Prompts(text, vision, finals)

    def text_token_embeds(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Hook: token embeddings [C, L, W] of the class texts, or None for CLIP's own lookup."""
        return None

    def mix_features(self, images: torch.Tensor, feats: Features) -> Features:
        """Hook: the features the logits use (HiCroPL mixes in its frozen teachers)."""
        return feats

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, feats: Features) -> dict[str, torch.Tensor]:
        """Hook: every term of `loss_terms` as a 0-dim tensor; "loss" is what is optimised."""
        l_cls = cls_loss(logits, labels)
        return {"loss": l_cls, "loss_cls": l_cls}

    # ----- the forward -----
    def _text_features(self, prompts: Prompts) -> torch.Tensor:
        # Name positions lie before [EOS], so placing E after truncation gives the same tokens.
        length = self.text_len if self.truncate_text else self.token_ids.shape[1]
        ids = self.token_ids[:, :length]
        feats = encode_text(self.backbone, ids, self.text_token_embeds(ids), prompts.text, length=length)
        return F.normalize(feats, dim=-1)

    def _cache_key(self) -> tuple:
        params = [p for p in self.parameters() if p.requires_grad]
        return (self._classes_version, self.truncate_text, str(self.clip.logit_scale.device),
                tuple(id(p) for p in params), tuple(p._version for p in params))

    def _encode(self, images: torch.Tensor) -> Features:
        if not self.classnames:
            raise PromptError("classnames: no class set; call set_classnames(names) first")
        use_cache = self.cache_text and not self.training and not torch.is_grad_enabled()
        if use_cache and self._cache is not None and self._cache[0] == self._cache_key():
            _, text_feats, prompts = self._cache
        else:
            prompts = self.compute_prompts()
            text_feats = self._text_features(prompts)
            if use_cache:
                self._cache = (self._cache_key(), text_feats, prompts)
            elif self._cache is not None:  # no attribute write in the training step (a compiled graph stays pure)
                self._cache = None
        image_feats = F.normalize(encode_image(self.backbone, images, prompts.vision), dim=-1)
        return self.mix_features(images, Features(image_feats, text_feats, prompts))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C] logits τ·cos(z_v, z_t(c)) over the current class set."""
        feats = self._encode(images)
        return self.backbone.logit_scale * feats.image @ feats.text.t()

    def forward_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{every name in `loss_terms`, logits}."""
        # Checked only where reading the values costs no device sync (the data layer checks every label
        # on load); on a GPU an out-of-range label still fails in cross_entropy.
        if labels.device.type == "cpu" and not torch.compiler.is_compiling() and (
                labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise ValueError(f"labels: expected values in 0..{len(self.classnames) - 1}, got {labels.min()}..{labels.max()}")
        feats = self._encode(images)
        logits = self.backbone.logit_scale * feats.image @ feats.text.t()
        return {**self.losses(logits, labels, feats), "logits": logits}

    def train(self, mode: bool = True) -> "PromptModel":
        super().train(mode)
        self.clip.eval()  # the frozen backbone never switches to training behaviour (dropout, patch dropout)
        self._cache = None
        return self

    # ----- trainable parameters -----
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        own = {k: p for k, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(f"trainable state dict: missing keys {missing}, unexpected keys {unexpected} for method {self.cfg.name!r}")
        for k, v in state_dict.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"trainable state dict: key {k!r} has shape {tuple(v.shape)}; expected {tuple(own[k].shape)}")
        # Parameters over one storage (HiCroPL's `released` aliases) take one value: a state dict that gives
        # them different values cannot be loaded (copying them in turn would keep only the last).
        first: dict[tuple, str] = {}
        for k, p in own.items():
            a = first.setdefault((p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)), k)
            if a != k and not torch.equal(state_dict[a].to(p.device, p.dtype), state_dict[k].to(p.device, p.dtype)):
                raise ValueError(f"trainable state dict: {k!r} differs from {a!r}; the model holds them in one storage")
        for k, v in state_dict.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
        self._cache = None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {g: [] for g in PARAM_GROUPS}
        if self.prompts is not None:
            for g, ps in self.prompts.groups().items():
                groups[g] += ps
        return {g: [p for p in ps if p.requires_grad] for g, ps in groups.items()}

    def num_trainable(self) -> int:
        """Trainable numbers, each storage counted once (HiCroPL's `released` aliases share one tensor's values)."""
        seen, total = set(), 0
        for p in self.parameters():
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
            if p.requires_grad and key not in seen:
                seen.add(key)
                total += p.numel()
        return total


def prompt_layers(cfg: MethodConfig, backbone: Backbone) -> tuple[int, ...]:
    """J for `cfg` on this backbone; a depth beyond the backbone's layers is an error naming it."""
    n_layers = min(backbone.text_layers, backbone.vision_layers)
    if cfg.layers is None and cfg.depth > n_layers:
        raise PromptError(f"method.depth: {cfg.depth} exceeds the model's {n_layers} layers; "
                          f"expected 1..{n_layers}")
    return check_layers(cfg.prompt_layers, n_layers)


def prompt_n_ctx(cfg: MethodConfig, backbone: Backbone) -> int:
    """n_ctx for `cfg` (the method's default when unset), checked against the context length."""
    n_ctx = cfg.n_ctx if cfg.n_ctx is not None else METHODS[cfg.name].n_ctx
    check_n_ctx(n_ctx, backbone)
    return n_ctx
