"""Prompt placement (docs/method.md): text positions 1..n_ctx, vision tokens appended then replaced, explicit layer lists."""

from __future__ import annotations

import torch

from hisf.model.encoders import encode_image, encode_text
from hisf.model.prompts import prefix_text, tokenize_classes


def test_class_text_layout(backbone):
    prefix, init = prefix_text(backbone, 2, "a photo of a")
    texts = tokenize_classes(backbone, ["sea turtle", "airliner"], prefix, 2)
    bpe = backbone.bpe
    assert texts.name_start == 5 and texts.name_lengths == (2, 2)
    row = texts.ids[0].tolist()
    sos, eos = backbone.tokenizer.sot_token_id, backbone.tokenizer.eot_token_id
    assert row[:10] == [sos] + bpe("a photo of a") + bpe("sea turtle") + bpe(".") + [eos] + [0]
    # P_t^0 starts from the embeddings of "a photo" (the first n_ctx tokens of ctx_init)
    torch.testing.assert_close(init, backbone.model.token_embedding.weight[bpe("a photo")], atol=0, rtol=0)
    # n_ctx beyond ctx_init's tokens: "X" placeholders and a random start (CoOp's 16-token context)
    prefix, init = prefix_text(backbone, 16, "a photo of a")
    assert prefix == " ".join(["X"] * 16) and init is None
    assert tokenize_classes(backbone, ["cat"], prefix, 16).name_start == 17


def test_deeper_start_layers_match_a_manual_loop(backbone, images):
    """J = [1, 2]: layer 0 runs unprompted; text positions 1..2 are replaced before blocks 1 and 2; vision
    tokens are appended before block 1 and replaced before block 2, then ignored by pooling."""
    model = backbone.model
    g = torch.Generator().manual_seed(3)
    pt = {l: torch.randn(2, 64, generator=g) for l in (1, 2)}
    pv = {l: torch.randn(2, 64, generator=g) for l in (1, 2)}
    ids = backbone.tokenize(["a photo of a sea turtle.", "a photo of a fox."])
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        for i, block in enumerate(model.transformer.resblocks):
            if i in pt:
                x = torch.cat([x[:, :1], pt[i].expand(2, -1, -1), x[:, 3:]], dim=1)
            x = block(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(2), ids.argmax(-1)] @ model.text_projection
        ours = encode_text(backbone, ids, prompts=pt)
        torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
        assert (ours - model.encode_text(ids)).abs().max() > 1e-3

        v = model.visual
        y = v._embeds(images)
        for i, block in enumerate(v.transformer.resblocks):
            if i == 1:
                y = torch.cat([y, pv[1].expand(4, -1, -1)], dim=1)
            if i == 2:
                y = torch.cat([y[:, :-2], pv[2].expand(4, -1, -1)], dim=1)
            y = block(y)
        y = v.ln_post(y[:, 0]) @ v.proj
        ours = encode_image(backbone, images, prompts=pv)
        torch.testing.assert_close(ours, y, atol=1e-5, rtol=0)
        assert (ours - model.encode_image(images)).abs().max() > 1e-3
