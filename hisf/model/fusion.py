"""Semantic Fusion (SF, paper eqs. 3-8): prompts attend to the class embeddings, then a zero-initialised bottleneck MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hisf.config import ConfigError
from hisf.model.members import MemberInit, MemberLayerNorm, MemberLinear


class SemanticFusion(nn.Module):
    """P_final = P_fused + MLP([P_fused ; ē]), P_fused = P + softmax(Q Kᵀ/√d) V (one prompt layer, every member).

    Q = LayerNorm(P) W_q, K = Ē W_k, V = Ē W_v (eqs. 3-5), multi-head with `heads` heads over `width`;
    ē is Ē's mean over classes, broadcast to each prompt token (eq. 8). Weights carry the member axis.
    """

    def __init__(self, init: MemberInit, width: int, heads: int = 8, bottleneck: int = 64, zero_values: bool = True):
        super().__init__()
        if width % heads:
            raise ConfigError(f"method.fusion_heads: {heads} heads do not divide the prompt width {width}")
        self.heads = heads
        self.norm = MemberLayerNorm(init, width)
        self.q = MemberLinear(init, width, width, bias=False)
        self.k = MemberLinear(init, width, width, bias=False)
        self.v = MemberLinear(init, width, width, bias=False)
        self.mlp = nn.Sequential(MemberLinear(init, 2 * width, bottleneck), nn.GELU(), MemberLinear(init, bottleneck, width))
        with torch.no_grad():
            if zero_values:
                # sf_zero_init (docs/method.md): W_v = 0, so Attn = 0 and P_fused = P at initialisation.
                self.v.weight.zero_()
            # Zero-initialised last layer: training starts at P_fused (docs/method.md).
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def forward(self, prompts: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
        """prompts [K, n_ctx, W], class_means Ē [K, C, W] -> P_final [K, n_ctx, W]."""
        k, n, w = prompts.shape
        h = self.heads
        q = self.q(self.norm(prompts)).view(k, n, h, w // h).transpose(1, 2)  # [K, h, n, d]
        keys = self.k(class_means).view(k, -1, h, w // h).transpose(1, 2)  # [K, h, C, d]
        values = self.v(class_means).view(k, -1, h, w // h).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, keys, values)  # softmax(Q Kᵀ / √d) V, eq. 6
        fused = prompts + attn.transpose(1, 2).reshape(k, n, w)  # eq. 7
        e_bar = class_means.mean(dim=1, keepdim=True).expand(k, n, w)
        return fused + self.mlp(torch.cat([fused, e_bar], dim=-1))  # eq. 8
