"""PromptModel: a frozen CLIP plus K members' prompt-side parameters; what differs per method lives in subclass hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hisf.config import MethodConfig
from hisf.model.backbone import Backbone
from hisf.model.encoders import encode_image, encode_text, image_stem, text_length
from hisf.model.facts import METHODS, PARAM_GROUPS
from hisf.model.losses import cls_loss
from hisf.model.members import per_member
from hisf.model.prompts import PromptError, check_layers, check_n_ctx, clean_classnames, tokenize_classes

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class Prompts:
    """What a method's prompt computation gives the encoders: prompts by layer ([K, n_ctx, W] each), plus method
    data (`aux`)."""

    text: dict[int, torch.Tensor] = field(default_factory=dict)
    vision: dict[int, torch.Tensor] = field(default_factory=dict)
    aux: Any = None  # e.g. HISF's (P_final by layer, Ē) for L_le


@dataclass
class Features:
    """The features the logits are made of (normalised), and what a method's losses need besides them."""

    image: torch.Tensor  # [K, B, E]
    text: torch.Tensor  # [K, C, E]
    prompts: Prompts
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. HiCroPL's teacher features


class PromptModel(nn.Module):
    """A frozen CLIP plus the prompt-side parameters of K members (a fused group; K = 1 is a plain trial), over a
    class set that may change.

    Every prompt-side parameter has the member axis first ([K, ...], hisf/model/members.py). Images arrive
    member-major ([K·B, 3, S, S]: member 0's batch first), or once for all members (`shared=True`: the same
    images scored by every member, as on a test split); logits are [K, B, C] and each loss term is [K].

    Method-agnostic: a method is a subclass that overrides the hooks `compute_prompts` (prompts by layer),
    `text_token_embeds` (token embeddings of the class texts), `on_classnames` (per-class-set data),
    `mix_features` (features the logits use) and `losses` (the terms named in `loss_terms`, "loss" first).
    The base class is CoOp/MaPLe: prompts from `self.prompts`, loss = L_cls.

    The prompts depend on the class set at most, not on the image, so the text encoder runs once per class
    and member per forward; in eval mode without grad the text features are cached until a trainable
    parameter, the class set or the device changes (a method whose forward changes its own parameters sets
    `cache_text = False`).
    """

    loss_terms: tuple[str, ...] = ("loss", "loss_cls")
    cache_text: bool = True
    # True when a forward changes trainable parameters in place (HiCroPL's released mapping): the engine then
    # re-broadcasts rank 0's parameters after evaluation, where ranks run different numbers of forwards.
    forward_writes_params: bool = False

    def __init__(self, cfg: MethodConfig, backbone: Backbone, n_ctx: int = 0, layers: tuple[int, ...] = (),
                 prefix: str = "", prompts: nn.Module | None = None, members: int = 1):
        super().__init__()
        self.cfg = cfg
        self.members = members
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
        """Hook: token embeddings [K, C, L, W] of the class texts per member, or None for CLIP's own lookup."""
        return None

    def mix_features(self, images: torch.Tensor, feats: Features, shared: bool = False) -> Features:
        """Hook: the features the logits use (HiCroPL mixes in its frozen teachers)."""
        return feats

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, feats: Features) -> dict[str, torch.Tensor]:
        """Hook: every term of `loss_terms` as a [K] tensor (one value per member); "loss" is what each member
        optimises. `logits` [K, B, C], `labels` [K, B]."""
        l_cls = cls_loss(logits, labels)
        return {"loss": l_cls, "loss_cls": l_cls}

    # ----- the forward -----
    def _text_features(self, prompts: Prompts) -> torch.Tensor:
        """[K, C, E] normalised; computed once for all members when nothing of the text side is per member."""
        # Name positions lie before [EOS], so placing E after truncation gives the same tokens.
        length = self.text_len if self.truncate_text else self.token_ids.shape[1]
        ids = self.token_ids[:, :length]
        embeds = self.text_token_embeds(ids)  # [K, C, L, W] or None (CLIP's own lookup)
        k, c = self.members, ids.shape[0]
        if embeds is None and not prompts.text:
            feats = encode_text(self.backbone, ids, length=length)
            return F.normalize(feats, dim=-1).unsqueeze(0).expand(k, -1, -1)
        embeds = embeds.reshape(k * c, *embeds.shape[2:]) if embeds is not None else None
        text = {l: per_member(p, c) for l, p in prompts.text.items()}
        feats = encode_text(self.backbone, ids.repeat(k, 1), embeds, text, length=length)
        return F.normalize(feats, dim=-1).view(k, c, -1)

    def _image_features(self, images: torch.Tensor, prompts: Prompts, shared: bool) -> torch.Tensor:
        """[K, B, E] normalised. `shared`: `images` [B, ...] are scored by every member (their stem runs once)."""
        k = self.members
        if not prompts.vision:
            feats = F.normalize(encode_image(self.backbone, images), dim=-1)
            return feats.unsqueeze(0).expand(k, -1, -1) if shared else feats.view(k, -1, feats.shape[-1])
        b = images.shape[0] if shared else images.shape[0] // k
        vision = {l: per_member(p, b) for l, p in prompts.vision.items()}
        stem = None
        if shared and k > 1:
            x = image_stem(self.backbone, images)  # [B, T, W], the same for every member
            stem = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        feats = encode_image(self.backbone, images, vision, stem=stem)
        return F.normalize(feats, dim=-1).view(k, b, -1)

    def _cache_key(self) -> tuple:
        params = [p for p in self.parameters() if p.requires_grad]
        return (self._classes_version, self.truncate_text, str(self.clip.logit_scale.device),
                tuple(id(p) for p in params), tuple(p._version for p in params))

    def _encode(self, images: torch.Tensor, shared: bool = False) -> Features:
        if not self.classnames:
            raise PromptError("classnames: no class set; call set_classnames(names) first")
        if not shared and images.shape[0] % self.members:
            raise ValueError(f"images: {images.shape[0]} images do not split into {self.members} members' batches")
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
        image_feats = self._image_features(images, prompts, shared)
        return self.mix_features(images, Features(image_feats, text_feats, prompts), shared)

    def forward(self, images: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """[K, B, C] logits τ·cos(z_v, z_t(c)) over the current class set, per member."""
        feats = self._encode(images, shared)
        return self.backbone.logit_scale * torch.bmm(feats.image, feats.text.transpose(1, 2))

    def forward_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{every name in `loss_terms`: [K], logits: [K, B, C]}; `labels` [K, B] (member-major images)."""
        # Checked only where reading the values costs no device sync (the data layer checks every label
        # on load); on a GPU an out-of-range label still fails in cross_entropy.
        if labels.device.type == "cpu" and not torch.compiler.is_compiling() and (
                labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise ValueError(f"labels: expected values in 0..{len(self.classnames) - 1}, got {labels.min()}..{labels.max()}")
        feats = self._encode(images)
        labels = labels.view(self.members, -1)  # after the encoders: no op before a method's eager write-back
        logits = self.backbone.logit_scale * torch.bmm(feats.image, feats.text.transpose(1, 2))
        return {**self.losses(logits, labels, feats), "logits": logits}

    def train(self, mode: bool = True) -> "PromptModel":
        super().train(mode)
        self.clip.eval()  # the frozen backbone never switches to training behaviour (dropout, patch dropout)
        self._cache = None
        return self

    # ----- trainable parameters (per member) -----
    def member_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every prompt-side parameter (trainable or frozen), each with the member axis first."""
        return [(k, p) for k, p in self.named_parameters() if not k.startswith("clip.")]

    def trainable_state_dict(self, member: int = 0) -> dict[str, torch.Tensor]:
        """Member `member`'s trainable tensors, shaped as a one-trial model's would be without the member axis."""
        return {k: p[member].detach().clone() for k, p in self.member_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], member: int = 0) -> None:
        own = {k: p for k, p in self.member_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(f"trainable state dict: missing keys {missing}, unexpected keys {unexpected} for method {self.cfg.name!r}")
        for k, v in state_dict.items():
            if tuple(v.shape) != tuple(own[k].shape[1:]):
                raise ValueError(f"trainable state dict: key {k!r} has shape {tuple(v.shape)}; expected {tuple(own[k].shape[1:])}")
        # Parameters over one storage (HiCroPL's `released` aliases) take one value: a state dict that gives
        # them different values cannot be loaded (copying them in turn would keep only the last).
        first: dict[tuple, str] = {}
        for k, p in own.items():
            a = first.setdefault((p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)), k)
            if a != k and not torch.equal(state_dict[a].to(p.device, p.dtype), state_dict[k].to(p.device, p.dtype)):
                raise ValueError(f"trainable state dict: {k!r} differs from {a!r}; the model holds them in one storage")
        for k, v in state_dict.items():
            own[k][member].copy_(v.to(own[k].device, own[k].dtype))
        self._cache = None

    @torch.no_grad()
    def keep_members(self, members: Sequence[int]) -> None:
        """Keep only `members` (indices into the current member axis), in that order: a fused group re-packs when
        members leave. Parameters keep their identity (their data shrinks); optimisers over the old member views
        must be rebuilt (the engine does)."""
        index = torch.as_tensor(list(members), dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.members:
            raise ValueError(f"keep_members: {list(members)} is not a non-empty subset of 0..{self.members - 1}")
        seen: dict[int, torch.Tensor] = {}
        for _, p in self.member_parameters():
            ptr = p.untyped_storage().data_ptr()
            if ptr not in seen:  # aliases (one storage) stay one storage
                seen[ptr] = p.data.index_select(0, index.to(p.device)).contiguous()
            p.data = seen[ptr]
        for name, buf in self.member_buffers().items():
            setattr(self, name, buf.index_select(0, index.to(buf.device)))
        self.on_keep_members(index)
        self.members = int(index.numel())
        self._cache = None

    def member_buffers(self) -> dict[str, torch.Tensor]:
        """Hook: buffers with a member axis (per-member loss weights), re-packed with the parameters."""
        return {}

    def on_keep_members(self, index: torch.Tensor) -> None:
        """Hook: per-member data outside parameters and buffers (HISF's label-embedding store)."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The stacked parameters by optimiser group; the engine gives each member an optimiser over its views."""
        groups = {g: [] for g in PARAM_GROUPS}
        if self.prompts is not None:
            for g, ps in self.prompts.groups().items():
                groups[g] += ps
        return {g: [p for p in ps if p.requires_grad] for g, ps in groups.items()}

    def num_trainable(self) -> int:
        """Trainable numbers of one member, each storage counted once (HiCroPL's `released` aliases share one
        tensor's values)."""
        seen, total = set(), 0
        for _, p in self.member_parameters():
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
            if p.requires_grad and key not in seen:
                seen.add(key)
                total += p.numel() // max(1, p.shape[0])
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
