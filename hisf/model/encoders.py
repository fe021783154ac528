"""The two CLIP encoders run block by block over `transformer.resblocks`, taking prompt tokens at chosen layers."""

from __future__ import annotations

from typing import Mapping

import torch
from open_clip.transformer import text_global_pool

from hisf.model.backbone import Backbone


def _blocks(transformer, x: torch.Tensor, attn_mask, step) -> torch.Tensor:
    """Run each residual block; `step(i, x)` edits the (batch-first) tokens before block i."""
    for i, block in enumerate(transformer.resblocks):
        x = step(i, x)
        if transformer.batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def text_length(backbone: Backbone, token_ids: torch.Tensor) -> int:
    """Token positions the text encoder must run: up to the last [EOS] (causal mask, so later ones don't matter).

    Reads the ids on the host: call it once per class set (PromptModel.set_classnames), not per step.
    """
    if backbone.model.text_pool_type != "argmax":
        return token_ids.shape[1]
    return int(token_ids.argmax(dim=-1).max().item()) + 1


def encode_text(
    backbone: Backbone,
    token_ids: torch.Tensor,
    token_embeds: torch.Tensor | None = None,
    prompts: Mapping[int, torch.Tensor] | None = None,
    truncate: bool = True,
    length: int | None = None,
) -> torch.Tensor:
    """Text features [N, embed_dim] in float32 (not normalised).

    `token_embeds` [N, L, W] replaces the token-embedding lookup (label embeddings placed by the caller);
    `prompts[l]` [n_ctx, W] (or [N, n_ctx, W]) takes positions 1..n_ctx before block l (docs/method.md): at layer 0
    in place of the token embeddings, before the positional embedding is added, as MaPLe does.
    `length` (from `text_length`, precomputed) runs only the first `length` positions without reading the
    ids on the host, so a compiled or CUDA-graphed step has no sync; without it, `truncate` computes it here.
    """
    model = backbone.model
    dtype = backbone.dtype
    prompts = prompts or {}
    n = token_ids.shape[0]
    if length is None:
        length = text_length(backbone, token_ids) if truncate else token_ids.shape[1]
    ids = token_ids[:, :length]
    x = model.token_embedding(ids) if token_embeds is None else token_embeds[:, :length]
    x = x.to(dtype)

    def place(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        p = p.to(dtype)
        p = p.expand(n, -1, -1) if p.dim() == 2 else p
        return torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)

    if 0 in prompts:
        x = place(x, prompts[0])
    x = x + model.positional_embedding[:length].to(dtype)
    mask = model.attn_mask
    if mask is not None:
        mask = mask[:length, :length].to(dtype)

    def step(i: int, x: torch.Tensor) -> torch.Tensor:
        return place(x, prompts[i]) if i > 0 and i in prompts else x

    x = _blocks(model.transformer, x, mask, step)
    x = model.ln_final(x)
    x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x.float()


def image_stem(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """[B, T, W]: patch embedding, [CLS] and positional embedding (before prompts and ln_pre), in the storage dtype.

    What precedes the first prompt does not depend on the prompts: members scoring the same images share it.
    """
    visual = backbone.model.visual
    b = images.shape[0]
    x = visual.conv1(images.to(backbone.dtype))
    x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    return visual.patch_dropout(x)


def encode_image(
    backbone: Backbone,
    images: torch.Tensor,
    prompts: Mapping[int, torch.Tensor] | None = None,
    stem: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image features [N, embed_dim] in float32 (not normalised).

    `prompts[l]` [n_ctx, Wv] (or [N, n_ctx, Wv], one per sample): at the first prompt layer the tokens are
    appended after `[CLS] + patches` (at layer 0 after the positional embedding and before `ln_pre`, MaPLe's
    order); at each later prompt layer the last n_ctx tokens are replaced before block l runs. `stem` [N, T, W]
    (`image_stem`, possibly expanded over the members that share the images) replaces computing it from `images`.
    """
    visual = backbone.model.visual
    dtype = backbone.dtype
    prompts = prompts or {}
    x = image_stem(backbone, images) if stem is None else stem
    b = x.shape[0]
    n_prompt = 0

    def place(x: torch.Tensor, p: torch.Tensor, n_prev: int) -> torch.Tensor:
        p = p.to(dtype).expand(b, -1, -1) if p.dim() == 2 else p.to(dtype)
        return torch.cat([x[:, : x.shape[1] - n_prev], p], dim=1)

    if 0 in prompts:
        x = place(x, prompts[0], 0)
        n_prompt = prompts[0].shape[-2]
    x = visual.ln_pre(x)

    def step(i: int, x: torch.Tensor) -> torch.Tensor:
        nonlocal n_prompt
        if i > 0 and i in prompts:
            x = place(x, prompts[i], n_prompt)
            n_prompt = prompts[i].shape[-2]
        return x

    x = _blocks(visual.transformer, x, None, step)
    if n_prompt:
        # Prompt tokens are not image tokens: [CLS] pooling ignores them anyway, average pooling must too.
        x = x[:, : x.shape[1] - n_prompt]
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled.float()
