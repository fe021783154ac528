"""The HISF losses (paper eqs. 9-12): L_cls, L_le, L_sa and their weighted sum, per member of a group, each kept for logging."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls = CE(τ·cos(z_v, z_t(c)), y) over the task's classes (eq. 11), per member: logits [K, B, C] (already
    carrying τ), labels [K, B] -> [K]."""
    k, b, c = logits.shape
    per_sample = F.cross_entropy(logits.float().reshape(k * b, c), labels.reshape(k * b), reduction="none")
    return per_sample.view(k, b).mean(dim=1)


def label_embedding_loss(finals: Sequence[torch.Tensor], class_means: torch.Tensor) -> torch.Tensor:
    """L_le = mean over classes c and prompt layers l of ‖mean_tokens(P_final^l) − ē_c‖₂ (eq. 9), in float32, per
    member: finals [K, n_ctx, W] per layer, class_means [K, C, W] -> [K]."""
    prompt_means = torch.stack([p.float().mean(dim=1) for p in finals], dim=1)  # [K, |J|, W]
    return (prompt_means[:, :, None, :] - class_means.float()[:, None, :, :]).norm(dim=-1).mean(dim=(1, 2))


def semantic_alignment_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sa = mean over the batch of 1 − cos(z_v, z_t(y)) (eq. 10), per member; features already L2-normalised:
    image [K, B, E], text [K, C, E], labels [K, B] -> [K]."""
    own = torch.gather(text_feats, 1, labels.unsqueeze(-1).expand(-1, -1, text_feats.shape[-1]))  # [K, B, E]
    return (1.0 - (image_feats.float() * own.float()).sum(dim=-1)).mean(dim=1)


def total_loss(
    loss_cls: torch.Tensor, loss_le: torch.Tensor, loss_sa: torch.Tensor,
    lambda_le: torch.Tensor | float, lambda_sa: torch.Tensor | float, use_cls: bool = True,
    use_le: bool | None = None, use_sa: bool | None = None,
) -> torch.Tensor:
    """L = L_cls + λ1·L_le + λ2·L_sa (eq. 12), per member (λ's are [K] tensors or numbers); `use_cls=False` drops
    L_cls (Table 5's ablation). A zero weight leaves its term out of the graph entirely (no gradient reaches what
    only that term reads, and a non-finite value of it cannot leak in): `use_le`/`use_sa` say so for tensor
    weights (the model knows it from the configs, without reading the device); for numbers it is derived."""
    use_le = (lambda_le != 0) if use_le is None and not torch.is_tensor(lambda_le) else use_le is not False
    use_sa = (lambda_sa != 0) if use_sa is None and not torch.is_tensor(lambda_sa) else use_sa is not False
    loss = loss_cls if use_cls else torch.zeros_like(loss_cls)
    if use_le:
        loss = loss + lambda_le * loss_le
    if use_sa:
        loss = loss + lambda_sa * loss_sa
    return loss
