"""The member axis of a fused group (docs/fusion.md): seeded per-member initialisation and prompt-side layers whose
parameters are stacked `[K, ...]` and computed for every member at once.

A trial is a group of one member (K = 1): these layers are the only prompt-side layers there are. Member k's
initial values are drawn from its own generator, seeded from its trial seed, so they are the same whatever
group it runs in. The layers keep the parameter names of the torch modules they replace (`weight`, `bias`,
`in_proj_weight`, `out_proj.*`), so a member's state dict reads like a plain module's.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# MethodConfig keys that may differ between the members of one model: loss weights (per-member [K] buffers) and an
# initialisation switch. Every other method key shapes the shared computation and must be equal.
METHOD_MEMBER_KEYS = ("lambda_le", "lambda_sa", "lambda_distill", "sf_zero_init")
# A zero weight leaves its term out of the graph (a one-trial model never adds it, so the parameters only it
# reaches get no gradient at all, and the optimiser skips them); members agree on which weights are zero.
LOSS_WEIGHTS = ("lambda_le", "lambda_sa")


def member_key(cfg) -> dict:
    """What members of one model must share: the method config without its per-member values, plus which
    loss weights are zero."""
    import dataclasses

    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in METHOD_MEMBER_KEYS}
    d.update({f"{k} == 0": getattr(cfg, k) == 0 for k in LOSS_WEIGHTS})
    return d


def check_members(cfg, members) -> None:
    """Every member shares `cfg`'s member_key; else a ValueError naming the key."""
    base = member_key(cfg)
    for i, m in enumerate(members):
        other = member_key(m)
        diff = sorted(k for k in base if base[k] != other[k])
        if diff:
            raise ValueError(f"members[{i}]: method.{diff[0]} is {other[diff[0]]!r}, the group's is {base[diff[0]]!r}; "
                             f"members of one model may differ only in {list(METHOD_MEMBER_KEYS)} (loss weights: "
                             "all zero or all non-zero)")


class MemberInit:
    """One torch.Generator per member; every random initial value of member k is drawn from generator k.

    Modules draw in construction order, so member k's sequence of draws (and so its initial values) does not
    depend on K or on the other members' seeds."""

    def __init__(self, seeds: Sequence[int]):
        if not seeds:
            raise ValueError("MemberInit: expected at least one member seed")
        self.seeds = tuple(int(s) for s in seeds)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    @property
    def members(self) -> int:
        return len(self.seeds)

    def stack(self, draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """[K, ...]: `draw(generator)` once per member, in member order."""
        return torch.stack([draw(g) for g in self.generators])

    def normal(self, shape: Sequence[int], std: float = 0.02) -> nn.Parameter:
        """N(0, std²) per member (MaPLe's and HiCroPL's prompt initialisation)."""
        return nn.Parameter(self.stack(lambda g: torch.randn(tuple(shape), generator=g) * std))

    def same(self, value: torch.Tensor) -> nn.Parameter:
        """The same initial value for every member (e.g. token embeddings of `ctx_init`)."""
        return nn.Parameter(value.detach().float().unsqueeze(0).repeat(self.members, *([1] * value.dim())))


def member_seeds(members: int) -> list[int]:
    """Seeds for callers that give none: drawn from the global torch RNG, so `torch.manual_seed` before a build
    still makes it reproducible."""
    return [int(s) for s in torch.randint(0, 2 ** 62, (members,))]


def _linear_init(g: torch.Generator, out_f: int, in_f: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear's reset_parameters (kaiming-uniform weight with a=√5, uniform bias in ±1/√fan_in), from `g`."""
    w = torch.empty(out_f, in_f)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    if not bias:
        return w, None
    bound = 1 / math.sqrt(in_f) if in_f > 0 else 0.0
    return w, torch.empty(out_f).uniform_(-bound, bound, generator=g)


class MemberLinear(nn.Module):
    """y_k = x_k W_kᵀ + b_k for every member k: `weight` [K, out, in], `bias` [K, out]; x [K, N, in] -> [K, N, out].

    `start`: "default" (nn.Linear's initialisation, per member), "identity" (W = I, b = 0: HISF's W_t starts as
    the identity so HISF starts where MaPLe starts) or "zeros"."""

    def __init__(self, init: MemberInit, in_features: int, out_features: int, bias: bool = True, start: str = "default"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        k = init.members
        if start == "default":
            drawn = [_linear_init(g, out_features, in_features, bias) for g in init.generators]
            self.weight = nn.Parameter(torch.stack([w for w, _ in drawn]))
            self.bias = nn.Parameter(torch.stack([b for _, b in drawn])) if bias else None
        elif start in ("identity", "zeros"):
            if start == "identity" and in_features != out_features:
                raise ValueError(f"MemberLinear: an identity start needs in == out, got {in_features} -> {out_features}")
            w = torch.eye(in_features) if start == "identity" else torch.zeros(out_features, in_features)
            self.weight = nn.Parameter(w.unsqueeze(0).repeat(k, 1, 1))
            self.bias = nn.Parameter(torch.zeros(k, out_features)) if bias else None
        else:
            raise ValueError(f"MemberLinear: unknown start {start!r}; expected default, identity or zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.unsqueeze(1), x, w)

    def extra_repr(self) -> str:
        return f"members={self.weight.shape[0]}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MemberLayerNorm(nn.Module):
    """LayerNorm over the last dimension with per-member affine `weight`/`bias` [K, W]; x [K, N, W]."""

    def __init__(self, init: MemberInit, width: int, eps: float = 1e-5):
        super().__init__()
        self.width, self.eps = width, eps
        self.weight = nn.Parameter(torch.ones(init.members, width))
        self.bias = nn.Parameter(torch.zeros(init.members, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, (self.width,), None, None, self.eps)
        return torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1))


class MemberAttention(nn.Module):
    """nn.MultiheadAttention's computation (packed in-projection, scaled dot-product attention, out-projection)
    with per-member weights: `in_proj_weight` [K, 3E, E], `in_proj_bias` [K, 3E], `out_proj` [K, E, E].

    Initialised as torch's module is (out-projection drawn as an nn.Linear with its bias then zeroed, Xavier-uniform
    in-projection, zero in-projection bias), per member. q [K, Lq, E], k and v [K, Lk, E] -> [K, Lq, E]."""

    def __init__(self, init: MemberInit, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MemberAttention: {num_heads} heads do not divide the width {embed_dim}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.out_proj = MemberLinear(init, embed_dim, embed_dim)
        w = torch.empty(init.members, 3 * embed_dim, embed_dim)
        for i, g in enumerate(init.generators):
            nn.init.xavier_uniform_(w[i], generator=g)
        self.in_proj_weight = nn.Parameter(w)
        self.in_proj_bias = nn.Parameter(torch.zeros(init.members, 3 * embed_dim))
        with torch.no_grad():
            self.out_proj.bias.zero_()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kk, e, h = q.shape[0], self.embed_dim, self.num_heads
        wq, wk, wv = self.in_proj_weight.chunk(3, dim=1)
        bq, bk, bv = self.in_proj_bias.chunk(3, dim=1)

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            y = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # [K, L, E]
            return y.view(kk, y.shape[1], h, e // h).transpose(1, 2)  # [K, h, L, d]

        attn = F.scaled_dot_product_attention(heads(q, wq, bq), heads(k, wk, bk), heads(v, wv, bv))
        return self.out_proj(attn.transpose(1, 2).reshape(kk, q.shape[1], e))


def per_member(p: torch.Tensor, count: int) -> torch.Tensor:
    """[K, n, W] -> [K·count, n, W]: each member's tensor repeated for its `count` sequences, member-major
    (the layout of a fused batch: member 0's samples first)."""
    k = p.shape[0]
    return p.unsqueeze(1).expand(k, count, *p.shape[1:]).reshape(k * count, *p.shape[1:])
