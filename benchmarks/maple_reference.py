"""A compact, independent re-implementation of MaPLe's reference formulation (its maple.py and vendored clip/model.py).

It shares no model code with `hisf/`: it rebuilds OpenAI's CLIP from an OpenAI-format state dict in
sequence-first (LND) layout with MaPLe's `ResidualAttentionBlock_MaPLe` prompt logic (a counter over
compound prompts; layer 0 takes its prompts at the input; layers 1..depth-1 replace them), and MaPLe's
`MultiModalPromptLearner` / `TextEncoder` / `CustomCLIP` forward. Used by tests/hisf/model to check our `maple`
logits and by benchmarks that time our encoders against MaPLe's formulation.

`to_maple_fp16` gives it the storage MaPLe trains with under `PREC: fp16`: OpenAI's `convert_weights` on
the CLIP part (matmul weights half, LayerNorms and embeddings float32) and the prompt learner's own dtypes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    """OpenAI CLIP's LayerNorm: computed in float32 (its weights stay float32 in half storage), cast back."""

    def forward(self, x):
        orig = x.dtype
        return super().forward(x.float()).to(orig)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlockMaPLe(nn.Module):
    """MaPLe's block: before attention, layers past the first replace the prompt tokens with the next deep prompt."""

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None, text_layer: bool, n_ctx: int, first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(d_model * 4, d_model))
        ]))
        self.ln_2 = LayerNorm(d_model)
        # A buffer, not a plain attribute: `.to(device)` must move the causal mask with the weights, or the
        # first CUDA forward mixes cuda:0 and cpu. Not persistent: it is rebuilt from the context length.
        self.register_buffer("attn_mask", attn_mask, persistent=False)
        self.text_layer = text_layer
        self.n_ctx = n_ctx
        self.first = first

    def attention(self, x):
        mask = self.attn_mask[: x.shape[0], : x.shape[0]].to(x.dtype) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, inputs):
        x, deeper, counter = inputs  # x: [L, N, D]
        if not self.first and len(deeper) > 0 and counter <= len(deeper) - 1:
            ctx = deeper[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2).to(x.dtype)
            if self.text_layer:
                x = torch.cat([x[:1], ctx, x[1 + self.n_ctx:]], dim=0)
            else:
                x = torch.cat([x[: x.shape[0] - self.n_ctx], ctx], dim=0)
            counter += 1
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return [x, deeper, counter]


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask, text_layer, n_ctx):
        super().__init__()
        self.resblocks = nn.Sequential(*[
            ResidualAttentionBlockMaPLe(width, heads, attn_mask, text_layer, n_ctx, first=(i == 0)) for i in range(layers)
        ])

    def forward(self, inputs):
        return self.resblocks(inputs)


class VisionTransformerMaPLe(nn.Module):
    def __init__(self, patch, width, layers, heads, grid, out_dim, n_ctx):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, None, text_layer=False, n_ctx=n_ctx)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x, shared_ctx, deep_prompts):
        x = self.conv1(x.to(self.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        visual_ctx = shared_ctx.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([x, visual_ctx], dim=1)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        x = self.transformer([x, deep_prompts, 0])[0]
        x = x.permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class ReferenceMaPLe(nn.Module):
    """MaPLe's CustomCLIP on OpenAI-format weights, with its prompt parameters taken from a MaPLe state dict.

    `device`: where the modules are created (on a GPU that skips the host-side random initialisation the
    loaded weights overwrite anyway). `set_classnames` switches the class set, which in MaPLe means a new
    prompt learner over the same parameters: only the tokenized prompts and their frozen embeddings change.
    """

    def __init__(self, clip_sd: Mapping[str, torch.Tensor], maple_sd: Mapping[str, torch.Tensor],
                 classnames: Sequence[str], tokenizer, text_heads: int, vision_heads: int,
                 ctx_init: str = "a photo of a", device: torch.device | str | None = None):
        super().__init__()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(clip_sd, maple_sd, text_heads, vision_heads)
        if device is not None:
            self.to(device)  # the prompt parameters come from `maple_sd`, wherever its tensors live
        self.ctx_init = ctx_init
        self.set_classnames(classnames, tokenizer)

    def _build(self, clip_sd, maple_sd, text_heads: int, vision_heads: int) -> None:
        sd = {k: v.float() for k, v in clip_sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        vw = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        vl = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        embed_dim = sd["text_projection"].shape[1]
        ctx_len = sd["positional_embedding"].shape[0]
        tw = sd["ln_final.weight"].shape[0]
        tl = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        ctx = maple_sd["prompt_learner.ctx"].float()
        n_ctx = ctx.shape[0]
        depth = 1 + sum(1 for k in maple_sd if k.startswith("prompt_learner.compound_prompts_text."))

        mask = torch.full((ctx_len, ctx_len), float("-inf")).triu_(1)
        self.visual = VisionTransformerMaPLe(patch, vw, vl, vision_heads, grid, embed_dim, n_ctx)
        self.transformer = Transformer(tw, tl, text_heads, mask, text_layer=True, n_ctx=n_ctx)
        self.token_embedding = nn.Embedding(sd["token_embedding.weight"].shape[0], tw)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx_len, tw))
        self.ln_final = LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.zeros(tw, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise KeyError(f"reference CLIP: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")

        # MaPLe's MultiModalPromptLearner: "a photo of a {name}." with positions 1..n_ctx learned.
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(tw, vw)
        self.proj.load_state_dict({"weight": maple_sd["prompt_learner.proj.weight"].float(),
                                   "bias": maple_sd["prompt_learner.proj.bias"].float()})
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(maple_sd[f"prompt_learner.compound_prompts_text.{i}"].float()) for i in range(depth - 1))
        self.compound_prompt_projections = nn.ModuleList()
        for i in range(depth - 1):
            lin = nn.Linear(tw, vw)
            lin.load_state_dict({"weight": maple_sd[f"prompt_learner.compound_prompt_projections.{i}.weight"].float(),
                                 "bias": maple_sd[f"prompt_learner.compound_prompt_projections.{i}.bias"].float()})
            self.compound_prompt_projections.append(lin)
        self.n_ctx = n_ctx

    @property
    def dtype(self) -> torch.dtype:
        """CLIP's storage dtype (OpenAI's `CLIP.dtype`: the patch embedding's)."""
        return self.visual.conv1.weight.dtype

    def set_classnames(self, classnames: Sequence[str], tokenizer) -> None:
        """MaPLe's prompt learner over `classnames`: "a photo of a {name}." with positions 1..n_ctx learned."""
        names = [n.replace("_", " ") for n in classnames]
        device = self.token_embedding.weight.device
        # Tokenized on the host (the tokenizer builds its tensor there), then moved.
        tokenized = tokenizer([f"{self.ctx_init} {n}." for n in names]).to(device)
        with torch.no_grad():
            # MaPLe: `clip_model.token_embedding(tokenized_prompts).type(dtype)`.
            embedding = self.token_embedding(tokenized).to(self.dtype)
        self.register_buffer("tokenized_prompts", tokenized)
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:, :])

    def prompt_learner(self):
        ctx = self.ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        visual_deep = [layer(self.compound_prompts_text[i]) for i, layer in enumerate(self.compound_prompt_projections)]
        return prompts, self.proj(self.ctx), list(self.compound_prompts_text), visual_deep

    def encode_text(self, prompts, deep_text):
        x = prompts + self.positional_embedding.to(prompts.dtype)  # MaPLe: `.type(self.dtype)`
        x = x.permute(1, 0, 2)
        x = self.transformer([x, deep_text, 0])[0]
        x = x.permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized_prompts.argmax(dim=-1)] @ self.text_projection

    def forward(self, images):
        prompts, shared_ctx, deep_text, deep_vision = self.prompt_learner()
        text = self.encode_text(prompts, deep_text)
        image = self.visual(images.to(self.dtype), shared_ctx, deep_vision)  # MaPLe: `image.type(self.dtype)`
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * image @ text.t()


def convert_weights(module: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """OpenAI CLIP's `convert_weights`: conv/linear/attention weights and the `text_projection`/`proj`
    matrices to `dtype`; LayerNorms, embeddings and `logit_scale` stay float32."""

    def convert(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        if isinstance(m, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"):
                t = getattr(m, name, None)
                if t is not None:
                    t.data = t.data.to(dtype)
        for name in ("text_projection", "proj"):
            t = getattr(m, name, None)
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(dtype)

    module.apply(convert)


def to_maple_fp16(ref: ReferenceMaPLe) -> ReferenceMaPLe:
    """`ref` in the storage MaPLe trains with under `PREC: fp16` (in place; returned for chaining).

    MaPLe's `build_model` runs OpenAI's `convert_weights` on CLIP, then builds its prompt learner with
    `ctx` in CLIP's dtype, `proj.half()`, and float32 compound prompts and compound projections (plain
    `nn.Parameter`/`nn.Linear`, cast to half where its blocks insert them); its frozen token embeddings are
    `.type(dtype)`. A blanket `.half()` would put the LayerNorms in half too, which MaPLe never does and
    which CUDA's (and the CPU's) layer norm refuses next to their float32 inputs.
    """
    for clip_part in (ref.visual, ref.transformer):
        convert_weights(clip_part)
    ref.text_projection.data = ref.text_projection.data.half()
    ref.ctx.data = ref.ctx.data.half()
    ref.proj.half()
    ref.token_prefix = ref.token_prefix.half()
    ref.token_suffix = ref.token_suffix.half()
    return ref


def reference_from_backbone(backbone, maple_sd: Mapping[str, torch.Tensor], classnames: Sequence[str],
                            ctx_init: str = "a photo of a") -> ReferenceMaPLe:
    """ReferenceMaPLe on the same weights as a hisf Backbone (only its state dict and head counts are read)."""
    model = backbone.model
    return ReferenceMaPLe(
        model.state_dict(), maple_sd, classnames, backbone.tokenizer,
        text_heads=model.transformer.resblocks[0].attn.num_heads,
        vision_heads=model.visual.transformer.resblocks[0].attn.num_heads,
        ctx_init=ctx_init,
    )
