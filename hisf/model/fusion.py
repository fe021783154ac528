"""Semantic Fusion (SF, paper eqs. 3-8): prompts attend to the class embeddings, then a zero-initialised bottleneck MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hisf.config import ConfigError


class SemanticFusion(nn.Module):
    """P_final = P_fused + MLP([P_fused ; ē]), P_fused = P + softmax(Q Kᵀ/√d) V (one prompt layer).

    Q = LayerNorm(P) W_q, K = Ē W_k, V = Ē W_v (eqs. 3-5), multi-head with `heads` heads over `width`;
    ē is Ē's mean over classes, broadcast to each prompt token (eq. 8).
    """

    def __init__(self, width: int, heads: int = 8, bottleneck: int = 64, zero_values: bool = True):
        super().__init__()
        if width % heads:
            raise ConfigError(f"method.fusion_heads: {heads} heads do not divide the prompt width {width}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * width, bottleneck), nn.GELU(), nn.Linear(bottleneck, width))
        if zero_values:
            # sf_zero_init (docs/method.md): W_v = 0, so Attn = 0 and P_fused = P at initialisation.
            nn.init.zeros_(self.v.weight)
        # Zero-initialised last layer: training starts at P_fused (docs/method.md).
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, prompts: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
        """prompts [n_ctx, W], class_means Ē [C, W] -> P_final [n_ctx, W]."""
        n, w = prompts.shape
        h = self.heads
        q = self.q(self.norm(prompts)).view(n, h, w // h).transpose(0, 1)  # [h, n, d]
        k = self.k(class_means).view(-1, h, w // h).transpose(0, 1)  # [h, C, d]
        v = self.v(class_means).view(-1, h, w // h).transpose(0, 1)
        attn = F.scaled_dot_product_attention(q, k, v)  # softmax(Q Kᵀ / √d) V, eq. 6
        fused = prompts + attn.transpose(0, 1).reshape(n, w)  # eq. 7
        e_bar = class_means.mean(dim=0, keepdim=True).expand(n, -1)
        return fused + self.mlp(torch.cat([fused, e_bar], dim=-1))  # eq. 8
