"""The HISF losses (paper eqs. 9-12): L_cls, L_le, L_sa and their weighted sum, each kept for logging."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls = CE(τ·cos(z_v, z_t(c)), y) over the task's classes (eq. 11); logits already carry τ."""
    return F.cross_entropy(logits.float(), labels)


def label_embedding_loss(finals: Sequence[torch.Tensor], class_means: torch.Tensor) -> torch.Tensor:
    """L_le = mean over classes c and prompt layers l of ‖mean_tokens(P_final^l) − ē_c‖₂ (eq. 9), in float32."""
    prompt_means = torch.stack([p.float().mean(dim=0) for p in finals])  # [|J|, W]
    return (prompt_means[:, None, :] - class_means.float()[None, :, :]).norm(dim=-1).mean()


def semantic_alignment_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sa = mean over the batch of 1 − cos(z_v, z_t(y)) (eq. 10); features already L2-normalised."""
    return (1.0 - (image_feats.float() * text_feats[labels].float()).sum(dim=-1)).mean()


def total_loss(
    loss_cls: torch.Tensor, loss_le: torch.Tensor, loss_sa: torch.Tensor,
    lambda_le: float, lambda_sa: float, use_cls: bool = True,
) -> torch.Tensor:
    """L = L_cls + λ1·L_le + λ2·L_sa (eq. 12); `use_cls=False` drops L_cls (Table 5's ablation)."""
    loss = loss_cls if use_cls else torch.zeros_like(loss_cls)
    if lambda_le:
        loss = loss + lambda_le * loss_le
    if lambda_sa:
        loss = loss + lambda_sa * loss_sa
    return loss
