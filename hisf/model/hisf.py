"""HISF (docs/method.md): coupled prompts (PI), Semantic Fusion over the label embeddings, and the L_le / L_sa losses."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hisf.config import MethodConfig
from hisf.model.backbone import Backbone
from hisf.model.fusion import SemanticFusion
from hisf.model.label_embeddings import LabelEmbeddings
from hisf.model.losses import cls_loss, label_embedding_loss, semantic_alignment_loss, total_loss
from hisf.model.members import MemberInit
from hisf.model.prompt_model import Features, PromptModel, Prompts, prompt_layers, prompt_n_ctx
from hisf.model.prompts import MultiModalPrompts, prefix_text


class HisfModel(PromptModel):
    """PromptModel with HISF's label embeddings E (at the class-name positions) and per-layer fusion.

    `aux` of its prompts is (P_final by layer, Ē) for L_le. With `sf_zero_init` and W_t = identity an
    untrained HISF computes exactly MaPLe's logits (docs/method.md). λ1, λ2 are per member ([K] buffers).
    """

    loss_terms = ("loss", "loss_cls", "loss_le", "loss_sa")

    def __init__(self, cfg: MethodConfig, backbone: Backbone, n_ctx: int, layers: tuple[int, ...], prefix: str,
                 prompts: MultiModalPrompts, label_embeddings: LabelEmbeddings, fusion: nn.ModuleList | None,
                 members: Sequence[MethodConfig]):
        super().__init__(cfg, backbone, n_ctx, layers, prefix, prompts, members=len(members))
        self.label_embeddings = label_embeddings
        self.fusion = fusion
        self.register_buffer("lambda_le", torch.tensor([m.lambda_le for m in members]), persistent=False)
        self.register_buffer("lambda_sa", torch.tensor([m.lambda_sa for m in members]), persistent=False)
        # Members agree on which weights are zero (hisf.model.members.check_members): a zero one adds no term.
        self.use_le, self.use_sa = cfg.lambda_le != 0, cfg.lambda_sa != 0

    def member_buffers(self) -> dict[str, torch.Tensor]:
        return {"lambda_le": self.lambda_le, "lambda_sa": self.lambda_sa}

    def on_keep_members(self, index: torch.Tensor) -> None:
        self.label_embeddings.keep_members(index)

    def on_classnames(self, names, dataset) -> None:
        self.label_embeddings.set_classnames(names)

    def compute_prompts(self) -> Prompts:
        means = self.label_embeddings.means()
        fuse = None
        if self.fusion is not None:
            def fuse(i: int, p: torch.Tensor) -> torch.Tensor:
                return self.fusion[0 if len(self.fusion) == 1 else i](p, means)
        text, vision, finals = self.prompts(fuse)
        return Prompts(text, vision, (finals, means))

    def text_token_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        return self.label_embeddings.place(self.clip.token_embedding(ids), self.name_start)

    def losses(self, logits, labels, feats: Features) -> dict[str, torch.Tensor]:
        finals, means = feats.prompts.aux
        l_cls = cls_loss(logits, labels)
        # le_detach (docs/method.md): L_le moves the prompts toward ē_c, never ē_c toward the prompts.
        l_le = label_embedding_loss(finals, means.detach() if self.cfg.le_detach else means)
        l_sa = semantic_alignment_loss(feats.image, feats.text, labels)
        loss = total_loss(l_cls, l_le, l_sa, self.lambda_le, self.lambda_sa, self.cfg.cls_loss, self.use_le, self.use_sa)
        return {"loss": loss, "loss_cls": l_cls, "loss_le": l_le, "loss_sa": l_sa}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        if self.fusion is not None:
            groups["fusion"] += [p for p in self.fusion.parameters() if p.requires_grad]
        if self.label_embeddings.table.requires_grad:
            groups["label_embeddings"].append(self.label_embeddings.table)
        return groups


def build_hisf(cfg: MethodConfig, backbone: Backbone, init: MemberInit, members: Sequence[MethodConfig]) -> HisfModel:
    n_ctx, layers = prompt_n_ctx(cfg, backbone), prompt_layers(cfg, backbone)
    prefix, token_init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = MultiModalPrompts(init, layers, n_ctx, backbone.text_width, backbone.vision_width, token_init, coupled=cfg.pi)
    fusion = None
    if cfg.sf:
        count = 1 if cfg.share_fusion else len(layers)
        # sf_zero_init may differ between members (initialisation only): each member's W_v starts as its own asks.
        fusion = nn.ModuleList(
            SemanticFusion(init, backbone.text_width, cfg.fusion_heads, cfg.fusion_bottleneck, zero_values=False)
            for _ in range(count)
        )
        with torch.no_grad():
            for k, m in enumerate(members):
                if m.sf_zero_init:
                    for f in fusion:
                        f.v.weight[k].zero_()
    label_embeddings = LabelEmbeddings(backbone, members=init.members, learnable=cfg.label_embedding == "learnable")
    return HisfModel(cfg, backbone, n_ctx, layers, prefix, prompts, label_embeddings, fusion, members)
