"""HiCroPL (docs/method.md): bidirectional cross-modal prompts, frozen image/text teachers mixed into the features, distillation."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from hisf.config import MethodConfig
from hisf.model.backbone import Backbone
from hisf.model.encoders import encode_image, encode_text
from hisf.model.hicropl_modules import HiCroPLPrompts
from hisf.model.losses import cls_loss
from hisf.model.members import MemberInit
from hisf.model.prompt_model import Features, PromptModel, Prompts, prompt_layers, prompt_n_ctx
from hisf.model.prompts import prefix_text

# Sentences per text-encoder call when building the text teacher (80 templates x many classes).
TEACHER_BATCH = 256


class HiCroPLModel(PromptModel):
    """PromptModel with HiCroPL's prompts and two frozen teachers.

    Image teacher g_v(x): the same frozen backbone without prompts (no grad). Text teacher w_c: the frozen
    text encoder (no prompts) over the class descriptions, mean of normalised sentence features, normalised;
    computed once per class set in `set_classnames` and kept per (descriptions, dataset, class names).
    Logits use z_v = norm(norm(f_v) + norm(g_v)), z_t = norm(norm(f_t) + w_c), in training and evaluation.

    Under `mapping: released` every forward (evaluation included) rewrites the stored prompts, as the
    released code does, so evaluation changes the prompts batch by batch; the eval text-feature cache is
    off for it (it would hide exactly that).
    """

    loss_terms = ("loss", "loss_cls", "loss_distill_text", "loss_distill_image")

    def __init__(self, cfg: MethodConfig, backbone: Backbone, n_ctx: int, layers: tuple[int, ...], prefix: str,
                 prompts: HiCroPLPrompts, members: Sequence[MethodConfig]):
        super().__init__(cfg, backbone, n_ctx, layers, prefix, prompts, members=len(members))
        self.register_buffer("lambda_distill", torch.tensor([m.lambda_distill for m in members]), persistent=False)
        self.cache_text = cfg.mapping != "released"
        self.forward_writes_params = cfg.mapping == "released"
        self.register_buffer("teacher_text", torch.zeros(0, backbone.embed_dim), persistent=False)
        self._teachers: dict[tuple, torch.Tensor] = {}

    # ----- teachers -----
    def on_classnames(self, names: tuple[str, ...], dataset: str | None) -> None:
        key = (self.cfg.descriptions, dataset, names)
        if key not in self._teachers:
            self._teachers[key] = self.text_teacher(names, dataset)
        self.teacher_text = self._teachers[key].to(self.clip.logit_scale.device)

    @torch.no_grad()
    def text_teacher(self, names: Sequence[str], dataset: str | None) -> torch.Tensor:
        """w [C, E]: per class, normalise(mean_j normalise(f_t(d_cj))) over its descriptions (frozen encoder)."""
        from hisf.model.descriptions import resolve_descriptions

        descriptions = resolve_descriptions(self.cfg.descriptions, dataset, list(names))
        sentences = [s for n in names for s in descriptions[n]]
        counts = [len(descriptions[n]) for n in names]
        feats = []
        for i in range(0, len(sentences), TEACHER_BATCH):
            ids = self.backbone.tokenize(sentences[i:i + TEACHER_BATCH]).to(self.clip.logit_scale.device)
            feats.append(F.normalize(encode_text(self.backbone, ids), dim=-1))
        per_class = torch.split(torch.cat(feats), counts)
        return F.normalize(torch.stack([f.mean(dim=0) for f in per_class]), dim=-1)

    @torch.no_grad()
    def image_teacher(self, images: torch.Tensor) -> torch.Tensor:
        """g_v(x) [N, E] normalised: the backbone's own image encoder, no prompts."""
        return F.normalize(encode_image(self.backbone, images), dim=-1)

    def member_buffers(self) -> dict[str, torch.Tensor]:
        return {"lambda_distill": self.lambda_distill}

    # ----- hooks -----
    def compute_prompts(self) -> Prompts:
        text, vision = self.prompts()
        return Prompts(text, vision)

    def mix_features(self, images: torch.Tensor, feats: Features, shared: bool = False) -> Features:
        k, b = feats.image.shape[:2]
        g_v = self.image_teacher(images)  # once per image: shared images serve every member
        g_v = g_v.unsqueeze(0).expand(k, -1, -1) if shared else g_v.view(k, b, -1)
        w = self.teacher_text.unsqueeze(0)  # [1, C, E]: the same descriptions for every member
        image = F.normalize(feats.image + g_v.to(feats.image.dtype), dim=-1)
        text = F.normalize(feats.text + w.to(feats.text.dtype), dim=-1)
        return Features(image, text, feats.prompts, {"teacher_image": g_v, "teacher_text": w})

    def losses(self, logits, labels, feats: Features) -> dict[str, torch.Tensor]:
        l_cls = cls_loss(logits, labels)
        t_text, t_image = feats.extra["teacher_text"], feats.extra["teacher_image"]
        # 1 - mean cosine to the teachers (both sides already unit vectors: cos = dot product), per member.
        l_text = 1.0 - (feats.text.float() * t_text.float()).sum(dim=-1).mean(dim=1)
        l_image = 1.0 - (feats.image.float() * t_image.float()).sum(dim=-1).mean(dim=1)
        loss = l_cls + self.lambda_distill * (l_text + l_image)
        return {"loss": loss, "loss_cls": l_cls, "loss_distill_text": l_text, "loss_distill_image": l_image}


def build_hicropl(cfg: MethodConfig, backbone: Backbone, init: MemberInit, members: Sequence[MethodConfig]) -> HiCroPLModel:
    n_ctx, layers = prompt_n_ctx(cfg, backbone), prompt_layers(cfg, backbone)
    # The released code starts layer 0 from `ctx_init` only when n_ctx <= 4; prefix_text does so exactly
    # when n_ctx fits in ctx_init's tokens ("a photo of a" = 4), else "X X ... X" and N(0, 0.02).
    prefix, token_init = prefix_text(backbone, n_ctx, cfg.ctx_init)
    prompts = HiCroPLPrompts(init, len(layers), cfg.cross_layer, n_ctx, backbone.text_width, backbone.vision_width,
                             token_init, cfg.lkp_heads, cfg.mapper_heads, cfg.mapping,
                             shared_storage=cfg.released_storage == "shared")
    return HiCroPLModel(cfg, backbone, n_ctx, layers, prefix, prompts, members)
