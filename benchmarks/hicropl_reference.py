"""An independent re-implementation of what HiCroPL's released code computes (its trainers/hicropl.py and clip/model.py).

It shares no model code with `hisf/`: it rebuilds OpenAI's CLIP from an OpenAI-format state dict in
sequence-first (LND) layout, with the released design's prompt insertion (layer 0 at the input; layer i in
1..D-1 replaces the prompt tokens with deep prompt i-1), and the released `CrossModalPromptLearner` and
`CustomCLIP` with the module and parameter names their Dassl checkpoints carry. What it reproduces, as the
released code runs it (the differences from the paper that matter for reproducing its numbers):
- every forward, train and eval, maps the prompts and writes the mapper outputs into the prompt parameters
  in place (`.data.copy_`), then the encoders read the parameters: no gradient reaches the mappers or LKPs,
  and each forward re-maps what the previous one wrote;
- the D visual prompt parameters are `nn.Parameter(t)` of one tensor `t` (one storage); so are the text
  proxy tokens, and the visual proxy tokens; the LKPs of a side are deep copies of one module. Dassl's Adam
  over `model.parameters()` (`dassl_optimizer`) keeps one moment estimate per parameter, so each step adds
  D Adam updates (one per layer's gradient) to the shared visual prompt values. The sharing lasts only while
  the model stays where it was built: the released trainer's `model.to(device)` (like any `.to()` that moves
  or casts, e.g. `.double()`) converts each parameter on its own and so unties them (on a GPU each layer then
  has its own visual prompt, equal at first);
- the frozen teachers: the zero-shot image encoder (saved as `prompt_learner.ZS_image_encoder.*`) and the
  text teacher from class descriptions, computed once per class set by a float32 CLIP; both are added to
  the normalised prompted features before the logits, and the loss is CE + λ·(two cosine distillations);
- `dtype=torch.float16` is the released PREC fp16 run (CLIP weights converted as `convert_weights` does,
  the prompt learner and the teacher image encoder stored in fp16, the text teacher in fp32). In float32 the
  same graph runs in float32 and the released code's `.half()` casts are left out (in its fp16 runs they are
  no-ops; its fp32 setting cannot run: the fp16 teacher receives fp32 images).
Used by tests/hisf/model to check our `hicropl` model with `mapping: released` and the checkpoint import.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.maple_reference import LayerNorm, QuickGELU  # OpenAI CLIP's fp32 LayerNorm and QuickGELU, shared by both references

_OPENAI_META = ("input_resolution", "context_length", "vocab_size")


class Block(nn.Module):
    """The released `ResidualAttentionBlock_HiCroPL`: block i in 1..D-1 replaces the prompt tokens with deep prompt i-1."""

    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None, index: int, n_ctx: int, text: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = LayerNorm(width)
        self.attn_mask = attn_mask  # a plain attribute, as released: not in the state dict
        self.index, self.n_ctx, self.text = index, n_ctx, text

    def forward(self, x: torch.Tensor, deeper: Sequence[torch.Tensor] | None) -> torch.Tensor:
        # x: [L, N, W]. `deeper` is None for the plain (teacher) encoders; D-1 deep prompts otherwise.
        if deeper is not None and 1 <= self.index <= len(deeper):
            ctx = deeper[self.index - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2).to(x.dtype)
            if self.text:
                x = torch.cat([x[:1], ctx, x[1 + self.n_ctx:]], dim=0)
            else:
                x = torch.cat([x[: x.shape[0] - self.n_ctx], ctx], dim=0)
        # Moved to the input's device at use, as OpenAI's CLIP block does (the mask is no buffer, so .to() skips it).
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask, n_ctx, text):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, attn_mask, i, n_ctx, text) for i in range(layers))

    def forward(self, x, deeper=None):
        for block in self.resblocks:
            x = block(x, deeper)
        return x


class VisionTransformer(nn.Module):
    """The released `VisionTransformer_HiCroPL` (and, called without prompts, the plain zero-shot teacher)."""

    def __init__(self, patch, width, layers, heads, grid, out_dim, n_ctx):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, None, n_ctx, text=False)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x, first=None, deeper=None):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if first is not None:  # layer-0 prompts after the positional embedding, before ln_pre (MaPLe's order)
            x = torch.cat([x, first.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x, deeper).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class TextEncoder(nn.Module):
    """The released `TextEncoder`: prompted token embeddings in, [EOS] features out."""

    def __init__(self, width, layers, heads, ctx_len, out_dim, n_ctx):
        super().__init__()
        mask = torch.full((ctx_len, ctx_len), float("-inf")).triu_(1)
        self.transformer = Transformer(width, layers, heads, mask, n_ctx, text=True)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx_len, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, embeds, token_ids, deeper=None):
        x = embeds + self.positional_embedding.to(embeds.dtype)
        x = self.transformer(x.permute(1, 0, 2), deeper).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ self.text_projection


class AttentionPooling(nn.Module):
    """The layer-specific knowledge proxy (LKP): proxy = LN_2(q + MHA(LN_1(q), LN_1(P), LN_1(P)))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim=width, num_heads=heads)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, query, key, value):
        query = query + self.attn(self.ln_1(query), self.ln_1(key), self.ln_1(value), need_weights=False)[0]
        return self.ln_2(query)


class CrossPromptAttention(nn.Module):
    """The knowledge mapper: queries at `width`, keys/values from `kv_width`, then an FFN."""

    def __init__(self, width: int, kv_width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim=width, num_heads=heads)
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(kv_width, width)
        self.linear_v = nn.Linear(kv_width, width)
        self.ln_1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, q, k, v):
        q, k, v = self.linear_q(q), self.linear_k(k), self.linear_v(v)
        q = q + self.attn(self.ln_1(q), self.ln_1(k), self.ln_1(v), need_weights=False)[0]
        return q + self.ffn(self.ln_2(q))


class CrossModalPromptLearner(nn.Module):
    """The released prompt learner; parameters created in the released order (seed the global RNG first)."""

    def __init__(self, n_ctx, depth, cross_layer, text_width, vision_width, ctx_embeds, token_embeds,
                 lkp_heads=8, mapper_heads=8, dtype=torch.float32):
        super().__init__()
        self.n_ctx, self.depth, self.cross_layer = n_ctx, depth, cross_layer
        if ctx_embeds is not None:  # n_ctx <= 4: the first n_ctx tokens of ctx_init
            ctx = ctx_embeds.to(dtype)
        else:
            ctx = torch.empty(n_ctx, text_width, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        self.cross_prompts_text = nn.ParameterList(
            [self.ctx] + [nn.Parameter(torch.empty(n_ctx, text_width, dtype=dtype)) for _ in range(depth - 1)])
        for p in list(self.cross_prompts_text)[1:]:
            nn.init.normal_(p, std=0.02)
        visual = torch.empty(n_ctx, vision_width, dtype=dtype)
        nn.init.normal_(visual, std=0.02)
        # One tensor, D parameters: every layer's visual prompt is the same storage (released fact 2).
        self.cross_prompts_visual = nn.ParameterList([nn.Parameter(visual) for _ in range(depth)])

        self.text2visual_net = CrossPromptAttention(vision_width, text_width, mapper_heads)
        self.visual2text_net = CrossPromptAttention(text_width, vision_width, mapper_heads)
        lkp_text = AttentionPooling(text_width, lkp_heads)
        self.attn_pooling_text_nets = nn.ModuleList(copy.deepcopy(lkp_text) for _ in range(cross_layer))
        lkp_visual = AttentionPooling(vision_width, lkp_heads)
        self.attn_pooling_visual_nets = nn.ModuleList(copy.deepcopy(lkp_visual) for _ in range(depth - cross_layer))
        text_proxy = torch.randn(1, text_width, dtype=dtype)
        self.text_proxy_token = nn.ParameterList([nn.Parameter(text_proxy) for _ in range(cross_layer)])
        visual_proxy = torch.randn(1, vision_width, dtype=dtype)
        self.visual_proxy_token = nn.ParameterList([nn.Parameter(visual_proxy) for _ in range(cross_layer, depth)])
        for net in (self.text2visual_net, self.visual2text_net, self.attn_pooling_text_nets, self.attn_pooling_visual_nets):
            net.to(dtype)
        # Saved in the checkpoint, rebuilt from the class names at load time.
        self.register_buffer("token_prefix", token_embeds[:, :1].to(dtype))
        self.register_buffer("token_suffix", token_embeds[:, 1 + n_ctx:].to(dtype))

    @torch.no_grad()
    def map_and_write_back(self) -> None:
        """Text->vision on layers 0..k-1, vision->text on k..D-1, each written into the parameters in place.

        Under no_grad: the released code writes through `.data`, so the mapping is outside the graph either way.
        """
        k, D = self.cross_layer, self.depth
        visual = torch.cat([self.cross_prompts_visual[i] for i in range(k)], dim=0)  # [k*n, Wv]
        proxies = torch.cat([self.attn_pooling_text_nets[i](self.text_proxy_token[i], self.cross_prompts_text[i],
                                                            self.cross_prompts_text[i]) for i in range(k)], dim=0)
        mapped = self.text2visual_net(visual, proxies, proxies).view(k, self.n_ctx, -1)
        for i in range(k):  # one storage: after this loop every visual prompt holds mapped[k-1]
            self.cross_prompts_visual[i].data.copy_(mapped[i])
        text = torch.cat([self.cross_prompts_text[i] for i in range(k, D)], dim=0)  # [(D-k)*n, Wt]
        proxies = torch.cat([self.attn_pooling_visual_nets[i - k](self.visual_proxy_token[i - k], self.cross_prompts_visual[i],
                                                                  self.cross_prompts_visual[i]) for i in range(k, D)], dim=0)
        mapped = self.visual2text_net(text, proxies, proxies).view(D - k, self.n_ctx, -1)
        for i in range(k, D):
            self.cross_prompts_text[i].data.copy_(mapped[i - k])

    def forward(self):
        self.map_and_write_back()
        ctx = self.cross_prompts_text[0].unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        text_input = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        return (text_input, self.cross_prompts_visual[0], list(self.cross_prompts_text)[1:],
                list(self.cross_prompts_visual)[1:])


class ReferenceHiCroPL(nn.Module):
    """The released `CustomCLIP`; its `state_dict()` has the keys of the released Dassl checkpoint."""

    def __init__(self, clip_sd: Mapping[str, torch.Tensor], classnames: Sequence[str],
                 descriptions: Mapping[str, Sequence[str]], tokenizer, text_heads: int, vision_heads: int,
                 n_ctx: int = 16, depth: int = 12, cross_layer: int = 6, lambd: float = 12.0,
                 lkp_heads: int = 8, mapper_heads: int = 8, ctx_init: str = "a photo of a",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        sd = {k: v.float() for k, v in clip_sd.items() if k not in _OPENAI_META}
        vw, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        vl = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        embed_dim, ctx_len = sd["text_projection"].shape[1], sd["positional_embedding"].shape[0]
        tw = sd["ln_final.weight"].shape[0]
        tl = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        self.dtype, self.lambd = dtype, lambd
        token_embedding = sd["token_embedding.weight"]

        def vision():
            v = VisionTransformer(patch, vw, vl, vision_heads, grid, embed_dim, n_ctx)
            v.load_state_dict({k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")})
            return v

        text = TextEncoder(tw, tl, text_heads, ctx_len, embed_dim, n_ctx)
        text.load_state_dict({k: t for k, t in sd.items() if k.startswith("transformer.") or k in (
            "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection")})

        # The text teacher w_c: a float32 plain CLIP over each class's descriptions, once per class set.
        with torch.no_grad():
            teacher = []
            for name in classnames:
                ids = tokenizer(list(descriptions[name]))
                f = text(F.embedding(ids, token_embedding), ids)
                f = f / f.norm(dim=-1, keepdim=True)
                f = f.mean(dim=0)
                teacher.append(f / f.norm())
        self.register_buffer("fixed_embeddings", torch.stack(teacher), persistent=False)

        ctx_embeds, prefix = None, " ".join(["X"] * n_ctx)
        if ctx_init and n_ctx <= 4:
            ids = tokenizer([ctx_init])
            ctx_embeds, prefix = F.embedding(ids, token_embedding)[0, 1:1 + n_ctx], ctx_init
        names = [n.replace("_", " ") for n in classnames]
        ids = tokenizer([f"{prefix} {n}." for n in names])
        self.register_buffer("tokenized_prompts", ids, persistent=False)
        self.prompt_learner = CrossModalPromptLearner(
            n_ctx, depth, cross_layer, tw, vw, ctx_embeds, F.embedding(ids, token_embedding),
            lkp_heads, mapper_heads, dtype)
        self.prompt_learner.ZS_image_encoder = vision().requires_grad_(False)
        self.image_encoder = vision().requires_grad_(False)
        self.text_encoder = text.requires_grad_(False)
        self.logit_scale = nn.Parameter(sd["logit_scale"].clone(), requires_grad=False)
        if dtype == torch.float16:  # the released fp16 run: clip.model.convert_weights on all three encoders
            for module in (self.prompt_learner.ZS_image_encoder, self.image_encoder, self.text_encoder):
                convert_weights(module)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits [B, C] in eval mode; in training mode the loss terms (and logits)."""
        with torch.no_grad():
            fixed_image = self.prompt_learner.ZS_image_encoder(images.to(self.dtype))
            fixed_image = fixed_image / fixed_image.norm(dim=-1, keepdim=True)
        text_input, visual_first, deep_text, deep_visual = self.prompt_learner()
        text = self.text_encoder(text_input, self.tokenized_prompts, deep_text)
        image = self.image_encoder(images.to(self.dtype), visual_first, deep_visual)
        image = image / image.norm(dim=-1, keepdim=True)
        image = image + fixed_image
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        text = text + self.fixed_embeddings.to(text.dtype)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * image @ text.t()
        if not self.prompt_learner.training:
            return logits
        loss_cls = F.cross_entropy(logits, labels)
        cos = nn.CosineSimilarity(dim=1, eps=1e-07)
        loss_text = 1.0 - torch.mean(cos(text, self.fixed_embeddings))  # float32 teacher, as released
        loss_image = 1.0 - torch.mean(cos(image, fixed_image))
        loss = loss_cls + self.lambd * (loss_text + loss_image)
        return {"loss": loss, "loss_cls": loss_cls, "loss_distill_text": loss_text,
                "loss_distill_image": loss_image, "logits": logits}


def convert_weights(module: nn.Module) -> None:
    """OpenAI CLIP's fp16 conversion: Linear/Conv/attention weights and projections; LayerNorms and embeddings stay float32."""

    def half(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias"):
                t = getattr(m, name)
                if t is not None:
                    t.data = t.data.half()
        for name in ("text_projection", "proj"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                t.data = t.data.half()

    module.apply(half)


def reference_from_backbone(backbone, classnames: Sequence[str], descriptions: Mapping[str, Sequence[str]],
                            **kwargs) -> ReferenceHiCroPL:
    """ReferenceHiCroPL on the same weights as a hisf Backbone (only its state dict and head counts are read)."""
    model = backbone.model
    return ReferenceHiCroPL(
        model.state_dict(), classnames, descriptions, backbone.tokenizer,
        text_heads=model.transformer.resblocks[0].attn.num_heads,
        vision_heads=model.visual.transformer.resblocks[0].attn.num_heads, **kwargs)


def dassl_optimizer(model: ReferenceHiCroPL, lr: float = 0.0025, weight_decay: float = 5e-4,
                    eps: float = 1e-3) -> torch.optim.Adam:
    """The released configs' optimiser as Dassl builds it: Adam over every parameter of the model (coupled L2)."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=eps)


def save_dassl_checkpoint(model: ReferenceHiCroPL, out_dir: str | Path, epoch: int = 1) -> Path:
    """Write `OUT/VLPromptLearner/model.pth.tar-EPOCH` as the released trainer's Dassl `save_model` does."""
    path = Path(out_dir) / "VLPromptLearner" / f"model.pth.tar-{epoch}"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": model.state_dict(), "epoch": epoch, "optimizer": None, "scheduler": None, "val_result": None}
    torch.save(state, path)
    return path
