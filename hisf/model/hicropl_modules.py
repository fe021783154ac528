"""HiCroPL's prompt side (docs/method.md): per-layer prompts, the layer-specific knowledge proxies (LKP), the two mappers.

Submodule and parameter names follow the released code's `prompt_learner` (`cross_prompts_text.{i}`,
`text2visual_net.linear_q.weight`, ...), so a released checkpoint maps onto them key for key.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from hisf.model.members import MemberAttention, MemberInit, MemberLayerNorm, MemberLinear
from hisf.model.prompts import PromptError


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x), CLIP's activation (the mapper's FFN uses it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AttentionPooling(nn.Module):
    """LKP: proxy = LN_b(q + MHA(LN_a(q), LN_a(P), LN_a(P))) summarises one layer's prompt P [K, n, W] into [K, 1, W]."""

    def __init__(self, init: MemberInit, width: int, heads: int):
        super().__init__()
        self.attn = MemberAttention(init, width, heads)
        self.ln_1 = MemberLayerNorm(init, width)
        self.ln_2 = MemberLayerNorm(init, width)

    def forward(self, query: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        kv = self.ln_1(prompt)
        query = query + self.attn(self.ln_1(query), kv, kv)
        return self.ln_2(query)


class CrossPromptAttention(nn.Module):
    """Mapper M(Q_in, KV_in): q = Lin_q(Q_in), x = q + MHA(LN_1 q, LN_1 Lin_k KV, LN_1 Lin_v KV), x + FFN(LN_2 x)."""

    def __init__(self, init: MemberInit, width: int, kv_width: int, heads: int):
        super().__init__()
        self.attn = MemberAttention(init, width, heads)
        self.linear_q = MemberLinear(init, width, width)
        self.linear_k = MemberLinear(init, kv_width, width)
        self.linear_v = MemberLinear(init, kv_width, width)
        self.ln_1 = MemberLayerNorm(init, width)
        self.ffn = nn.Sequential(OrderedDict([
            ("c_fc", MemberLinear(init, width, width * 4)), ("gelu", QuickGELU()),
            ("c_proj", MemberLinear(init, width * 4, width))]))
        self.ln_2 = MemberLayerNorm(init, width)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q [K, Lq, W], kv [K, Lk, W_kv] -> [K, Lq, W]."""
        q = self.linear_q(q)
        k, v = self.linear_k(kv), self.linear_v(kv)
        q = q + self.attn(self.ln_1(q), self.ln_1(k), self.ln_1(v))
        return q + self.ffn(self.ln_2(q))


def check_heads(heads: int, widths: dict[str, int], key: str) -> None:
    for what, width in widths.items():
        if width % heads:
            raise PromptError(f"{key}: {heads} heads do not divide the {what} width {width}")


class HiCroPLPrompts(nn.Module):
    """Text prompts P_t^l, visual prompts P_v^l (l < D), proxies, LKPs and mappers, each with the member axis first;
    forward gives the encoders' prompts.

    `mapping="learned"` (the paper): independent per-layer prompts and proxies; the encoders get
    text = raw P_t^l for l < k, M_v→t(...) for l >= k; vision = M_t→v(...) for l < k, raw P_v^l for l >= k;
    gradients reach every prompt, proxy, LKP and mapper.

    `mapping="released"` (the released code, docs/method.md): each forward maps without grad and writes the
    mapper outputs into the stored prompts (visual: layers 0..k-1; text: layers k..D-1), then the encoders
    read the stored prompts. So the mappers and LKPs get no gradient, and every forward (eval too) changes
    the prompts. As in the released code there are D visual prompt parameters, k text and D-k visual proxy
    parameters, each its own `nn.Parameter` (so Adam keeps one moment state per layer and adds one update
    per layer's gradient); with `shared_storage=True` (the released code as built, and as it stays on CPU)
    the D visual prompts are `nn.Parameter(t)` of ONE tensor `t`, and so are each side's proxy tokens: the
    text->vision write-back then leaves layer k-1's mapped prompt in every layer. `shared_storage=False` is
    the released code after `model.to(device)` moves it to another device or dtype (torch copies each
    parameter separately, which unties them): same initial values, then per-layer storages. The sharing
    survives our own `.to()` (`_apply` re-ties it), so one config trains alike on every device. The released
    code keeps these parameters in fp16; we keep fp32 master parameters (the mapping runs in the step's
    autocast dtype and is stored in fp32).
    """

    def __init__(self, init: MemberInit, depth: int, cross_layer: int, n_ctx: int, text_width: int, vision_width: int,
                 token_init: torch.Tensor | None, lkp_heads: int = 8, mapper_heads: int = 8, mapping: str = "learned",
                 shared_storage: bool = True):
        super().__init__()
        widths = {"text": text_width, "vision": vision_width}
        check_heads(lkp_heads, widths, "method.lkp_heads")
        check_heads(mapper_heads, widths, "method.mapper_heads")
        self.depth, self.k, self.n_ctx, self.mapping = depth, cross_layer, n_ctx, mapping
        released = mapping == "released"
        text = [init.normal((n_ctx, text_width)) for _ in range(depth)]
        if token_init is not None:
            text[0] = init.same(token_init)
        self.cross_prompts_text = nn.ParameterList(text)
        k, late = cross_layer, depth - cross_layer
        # Released: one tensor behind all of a list's parameters (the released `nn.Parameter(t) for _ in ...`).
        self.shared_storage = released and shared_storage
        if released:
            self.cross_prompts_visual = self._aliases(init.normal((n_ctx, vision_width)), depth)
            self.text_proxy_token = self._aliases(init.normal((1, text_width), 1.0), k)
            self.visual_proxy_token = self._aliases(init.normal((1, vision_width), 1.0), late)
        else:
            self.cross_prompts_visual = nn.ParameterList(init.normal((n_ctx, vision_width)) for _ in range(depth))
            self.text_proxy_token = nn.ParameterList(init.normal((1, text_width), 1.0) for _ in range(k))
            self.visual_proxy_token = nn.ParameterList(init.normal((1, vision_width), 1.0) for _ in range(late))
        # The released code deep-copies one LKP per layer (identical start); we do the same in both mappings.
        self.attn_pooling_text_nets = nn.ModuleList(
            copy.deepcopy(m) for m in [AttentionPooling(init, text_width, lkp_heads)] * k)
        self.attn_pooling_visual_nets = nn.ModuleList(
            copy.deepcopy(m) for m in [AttentionPooling(init, vision_width, lkp_heads)] * late)
        self.text2visual_net = CrossPromptAttention(init, vision_width, text_width, mapper_heads)
        self.visual2text_net = CrossPromptAttention(init, text_width, vision_width, mapper_heads)

    def _aliases(self, t: torch.Tensor, count: int) -> nn.ParameterList:
        """`count` parameters over `t`: one storage when shared, else equal copies (the released code after .to())."""
        return nn.ParameterList(nn.Parameter(t.data if self.shared_storage else t.detach().clone()) for _ in range(count))

    def shared_lists(self) -> tuple[nn.ParameterList, ...]:
        """The parameter lists whose members share one storage (empty unless released with shared storage)."""
        if not self.shared_storage:
            return ()
        return self.cross_prompts_visual, self.text_proxy_token, self.visual_proxy_token

    def _apply(self, fn, recurse: bool = True):
        # Module._apply converts each parameter on its own (`param.data = fn(param)`), which would give every
        # alias its own copy on a device or dtype change, as happens to the released code on `.to("cuda")`.
        super()._apply(fn, recurse)
        for plist in self.shared_lists():
            first = plist[0]
            for p in list(plist)[1:]:
                if p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
                    p.data = first.data
        return self

    # ----- the pieces (shared by both mappings) -----
    def _text_proxy(self, i: int) -> torch.Tensor:
        return self.text_proxy_token[i]

    def _visual_proxy(self, j: int) -> torch.Tensor:
        return self.visual_proxy_token[j]

    def visual(self, l: int) -> torch.Tensor:
        """The stored visual prompt of layer l (under `released` with shared storage, an alias of all the others)."""
        return self.cross_prompts_visual[l]

    def text_to_vision(self) -> torch.Tensor:
        """[K, k, n, Wv]: M_t→v(visual prompts of layers 0..k-1, text proxies of layers 0..k-1), per member."""
        k, n = self.k, self.n_ctx
        proxies = torch.cat([self.attn_pooling_text_nets[i](self._text_proxy(i), self.cross_prompts_text[i])
                             for i in range(k)], dim=1)  # [K, k, Wt]
        queries = torch.cat([self.visual(l) for l in range(k)], dim=1)  # [K, k*n, Wv]
        out = self.text2visual_net(queries, proxies)
        return out.view(out.shape[0], k, n, -1)

    def vision_to_text(self) -> torch.Tensor:
        """[K, D-k, n, Wt]: M_v→t(text prompts of layers k..D-1, visual proxies of layers k..D-1), per member."""
        k, d, n = self.k, self.depth, self.n_ctx
        proxies = torch.cat([self.attn_pooling_visual_nets[l - k](self._visual_proxy(l - k), self.visual(l))
                             for l in range(k, d)], dim=1)  # [K, D-k, Wv]
        queries = torch.cat([self.cross_prompts_text[l] for l in range(k, d)], dim=1)  # [K, (D-k)*n, Wt]
        out = self.visual2text_net(queries, proxies)
        return out.view(out.shape[0], d - k, n, -1)

    # ----- the encoders' prompts -----
    def forward(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(text prompts by layer, vision prompts by layer) for layers 0..D-1."""
        if self.mapping == "released":
            self.write_back()
            return ({l: self.cross_prompts_text[l] for l in range(self.depth)},
                    {l: self.visual(l) for l in range(self.depth)})
        k, d = self.k, self.depth
        mapped_v, mapped_t = self.text_to_vision(), self.vision_to_text()
        text = {l: (self.cross_prompts_text[l] if l < k else mapped_t[:, l - k]) for l in range(d)}
        vision = {l: (mapped_v[:, l] if l < k else self.cross_prompts_visual[l]) for l in range(d)}
        return text, vision

    # Outside any compiled graph: aot_autograd cannot mutate inputs that share a storage (the aliased visual
    # prompts), so a compiled `released` step breaks here once and runs the write-back eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def write_back(self) -> None:
        """The released code's in-place update: text→vision first, then vision→text from the written values."""
        mapped_v = self.text_to_vision()
        for l in range(self.k):  # with shared storage every layer is one tensor: the last write (layer k-1) stays
            self.visual(l).copy_(mapped_v[:, l])
        mapped_t = self.vision_to_text()
        for l in range(self.k, self.depth):
            self.cross_prompts_text[l].copy_(mapped_t[:, l - self.k])

    def groups(self) -> dict[str, list[nn.Parameter]]:
        prompts = [*self.cross_prompts_text, *self.cross_prompts_visual, *self.text_proxy_token, *self.visual_proxy_token]
        nets = [*self.attn_pooling_text_nets.parameters(), *self.attn_pooling_visual_nets.parameters(),
                *self.text2visual_net.parameters(), *self.visual2text_net.parameters()]
        return {"prompts": prompts, "projections": nets}
