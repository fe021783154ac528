"""The method registry (zeroshot, coop, maple, hisf) and the PromptModel every method is."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hisf.model.backbone import Backbone
from hisf.config import ConfigError, MethodConfig
from hisf.model.encoders import encode_image, encode_text, text_length
from hisf.model.fusion import SemanticFusion
from hisf.model.label_embeddings import LabelEmbeddings
from hisf.model.losses import cls_loss, label_embedding_loss, semantic_alignment_loss, total_loss
from hisf.model.prompts import (
    MultiModalPrompts,
    PromptError,
    check_layers,
    check_n_ctx,
    clean_classnames,
    prefix_text,
    tokenize_classes,
)

DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_N_CTX = {"zeroshot": 0, "coop": 16, "maple": 2, "hisf": 2}
GROUPS = ("prompts", "projections", "fusion", "label_embeddings")


class PromptModel(nn.Module):
    """A frozen CLIP plus a method's prompt-side parameters, over a class set that may change.

    The prompts depend on the class set (SF's keys/values) but not on the image, so the text encoder
    runs once per class per forward; in eval mode without grad the text features are cached until a
    trainable parameter, the class set or the device changes.
    """

    def __init__(
        self,
        cfg: MethodConfig,
        backbone: Backbone,
        n_ctx: int = 0,
        layers: tuple[int, ...] = (),
        prefix: str = "",
        prompts: MultiModalPrompts | None = None,
        label_embeddings: LabelEmbeddings | None = None,
        fusion: nn.ModuleList | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.clip = backbone.model  # a submodule so .to(device) moves it; frozen, never in the optimiser
        self.n_ctx = n_ctx
        self.layers = layers
        self.prefix = prefix
        self.prompts = prompts
        self.label_embeddings = label_embeddings
        self.fusion = fusion
        # Fast path: run only the token positions up to the longest class prompt's [EOS].
        self.truncate_text = True
        self.classnames: tuple[str, ...] = ()
        self.template = DEFAULT_TEMPLATE
        self.register_buffer("token_ids", torch.zeros(0, backbone.context_length, dtype=torch.long), persistent=False)
        self.name_start = 0
        self.text_len = backbone.context_length  # positions up to the last [EOS], set with the class set
        self._classes_version = 0
        self._cache: tuple | None = None

    # ----- class set -----
    def set_classnames(self, names: Sequence[str], template: str | None = None) -> None:
        """Switch the class set; HISF's label embeddings for new names start from the names' tokens."""
        names = tuple(clean_classnames(names))
        device = self.clip.logit_scale.device
        if self.cfg.name == "zeroshot":
            template = template or self.template
            if "{}" not in template:
                raise PromptError(f"template: {template!r} has no '{{}}' where the class name goes")
            self.template = template
            texts = [template.format(n) for n in names]
            too_long = [t for t in texts if len(self.backbone.bpe(t)) + 2 > self.backbone.context_length]
            if too_long:
                raise PromptError(f"classnames: prompt {too_long[0]!r} exceeds context length {self.backbone.context_length}")
            ids = self.backbone.tokenize(texts)
        else:
            texts = tokenize_classes(self.backbone, names, self.prefix, self.n_ctx)
            ids = texts.ids
            self.name_start = texts.name_start
        # Read on the host once per class set, so the step itself never syncs (issue 2 item 8, issue 4).
        self.text_len = text_length(self.backbone, ids)
        self.token_ids = ids.to(device)
        if self.label_embeddings is not None:
            self.label_embeddings.set_classnames(names)
        self.classnames = names
        self._classes_version += 1
        self._cache = None

    # ----- prompt-side computation -----
    def class_prompts(self):
        """(text prompts by layer, vision prompts by layer, P_final per prompt layer, Ē or None)."""
        if self.prompts is None:
            return {}, {}, [], None
        means = self.label_embeddings.means() if self.label_embeddings is not None else None
        fuse = None
        if self.fusion is not None:
            def fuse(i: int, p: torch.Tensor) -> torch.Tensor:
                return self.fusion[0 if len(self.fusion) == 1 else i](p, means)
        text, vision, finals = self.prompts(fuse)
        return text, vision, finals, means

    def _text_features(self, text_prompts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        # Name positions lie before [EOS], so placing E after truncation gives the same tokens.
        length = self.text_len if self.truncate_text else self.token_ids.shape[1]
        ids = self.token_ids[:, :length]
        embeds = None
        if self.label_embeddings is not None:
            embeds = self.label_embeddings.place(self.clip.token_embedding(ids), self.name_start)
        feats = encode_text(self.backbone, ids, embeds, text_prompts, length=length)
        return F.normalize(feats, dim=-1)

    def _cache_key(self) -> tuple:
        params = [p for p in self.parameters() if p.requires_grad]
        return (self._classes_version, self.truncate_text, str(self.clip.logit_scale.device),
                tuple(id(p) for p in params), tuple(p._version for p in params))

    def _encode(self, images: torch.Tensor):
        if not self.classnames:
            raise PromptError("classnames: no class set; call set_classnames(names) first")
        use_cache = not self.training and not torch.is_grad_enabled()
        if use_cache and self._cache is not None and self._cache[0] == self._cache_key():
            _, text_feats, vision, finals, means = self._cache
        else:
            text, vision, finals, means = self.class_prompts()
            text_feats = self._text_features(text)
            if use_cache:
                self._cache = (self._cache_key(), text_feats, vision, finals, means)
            elif self._cache is not None:  # no attribute write in the training step (a compiled graph stays pure)
                self._cache = None
        image_feats = F.normalize(encode_image(self.backbone, images, vision), dim=-1)
        return image_feats, text_feats, finals, means

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C] logits τ·cos(z_v, z_t(c)) over the current class set."""
        image_feats, text_feats, _, _ = self._encode(images)
        return self.backbone.logit_scale * image_feats @ text_feats.t()

    def forward_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{loss, loss_cls, loss_le, loss_sa, logits}; baselines (zeroshot, coop, maple) train on L_cls only."""
        # Checked only where reading the values costs no device sync (the data layer checks every label
        # on load); on a GPU an out-of-range label still fails in cross_entropy.
        if labels.device.type == "cpu" and not torch.compiler.is_compiling() and (
                labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise ValueError(f"labels: expected values in 0..{len(self.classnames) - 1}, got {labels.min()}..{labels.max()}")
        image_feats, text_feats, finals, means = self._encode(images)
        logits = self.backbone.logit_scale * image_feats @ text_feats.t()
        l_cls = cls_loss(logits, labels)
        l_sa = semantic_alignment_loss(image_feats, text_feats, labels)
        if self.cfg.name == "hisf":
            l_le = label_embedding_loss(finals, means)
            loss = total_loss(l_cls, l_le, l_sa, self.cfg.lambda_le, self.cfg.lambda_sa, self.cfg.cls_loss)
        else:
            l_le = torch.zeros((), device=logits.device)
            loss = l_cls
        return {"loss": loss, "loss_cls": l_cls, "loss_le": l_le, "loss_sa": l_sa, "logits": logits}

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
        for k, v in state_dict.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
        self._cache = None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {g: [] for g in GROUPS}
        if self.prompts is not None:
            for g, ps in self.prompts.groups().items():
                groups[g] += ps
        if self.fusion is not None:
            groups["fusion"] += list(self.fusion.parameters())
        if self.label_embeddings is not None:
            groups["label_embeddings"].append(self.label_embeddings.table)
        return {g: [p for p in ps if p.requires_grad] for g, ps in groups.items()}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _layers(cfg: MethodConfig, backbone: Backbone) -> tuple[int, ...]:
    n_layers = min(backbone.text_layers, backbone.vision_layers)
    if cfg.layers is None and cfg.depth > n_layers:
        raise PromptError(f"method.depth: {cfg.depth} exceeds the model's {n_layers} layers; expected 1..{n_layers}")
    return check_layers(cfg.prompt_layers, n_layers)


def _n_ctx(cfg: MethodConfig, backbone: Backbone) -> int:
    n_ctx = cfg.n_ctx if cfg.n_ctx is not None else DEFAULT_N_CTX[cfg.name]
    check_n_ctx(n_ctx, backbone)
    return n_ctx


def build_zeroshot(cfg: MethodConfig, backbone: Backbone) -> PromptModel:
    return PromptModel(cfg, backbone)


def build_coop(cfg: MethodConfig, backbone: Backbone) -> PromptModel:
    n_ctx = _n_ctx(cfg, backbone)
    prefix, init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = MultiModalPrompts((0,), n_ctx, backbone.text_width, backbone.vision_width, init, coupled=False, vision=False)
    return PromptModel(cfg, backbone, n_ctx, (0,), prefix, prompts)


def build_maple(cfg: MethodConfig, backbone: Backbone) -> PromptModel:
    n_ctx, layers = _n_ctx(cfg, backbone), _layers(cfg, backbone)
    prefix, init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = MultiModalPrompts(layers, n_ctx, backbone.text_width, backbone.vision_width, init, coupled=True, text_map=False)
    return PromptModel(cfg, backbone, n_ctx, layers, prefix, prompts)


def build_hisf(cfg: MethodConfig, backbone: Backbone) -> PromptModel:
    n_ctx, layers = _n_ctx(cfg, backbone), _layers(cfg, backbone)
    prefix, init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = MultiModalPrompts(layers, n_ctx, backbone.text_width, backbone.vision_width, init, coupled=cfg.pi)
    fusion = None
    if cfg.sf:
        count = 1 if cfg.share_fusion else len(layers)
        fusion = nn.ModuleList(
            SemanticFusion(backbone.text_width, cfg.fusion_heads, cfg.fusion_bottleneck) for _ in range(count)
        )
    label_embeddings = LabelEmbeddings(backbone, learnable=cfg.label_embedding == "learnable")
    return PromptModel(cfg, backbone, n_ctx, layers, prefix, prompts, label_embeddings, fusion)


METHODS: dict[str, Callable[[MethodConfig, Backbone], PromptModel]] = {
    "zeroshot": build_zeroshot,
    "coop": build_coop,
    "maple": build_maple,
    "hisf": build_hisf,
}


def build_method(
    cfg: MethodConfig, backbone: Backbone, classnames: Sequence[str], template: str | None = None
) -> PromptModel:
    """Build method `cfg.name` on a frozen backbone over `classnames` (zeroshot reads `template`)."""
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r}; expected one of {sorted(METHODS)}")
    cfg.validate()
    model = METHODS[cfg.name](cfg, backbone)
    model.to(backbone.device)
    model.set_classnames(classnames, template)
    return model
