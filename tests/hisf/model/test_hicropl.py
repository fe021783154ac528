"""HiCroPL on the tiny model: placement of mapped prompts, gradients, teachers, loss, released write-back, bad config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hisf.config import ConfigError, MethodConfig
from hisf.model.encoders import encode_image, encode_text
from hisf.model.methods import build_method
from hisf.model.prompts import PromptError

N, D, K = 4, 3, 2  # tiny: 3 layers; text prompts mapped on layer 2, visual prompts on layers 0 and 1


def _hicropl(backbone, classes, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MethodConfig(name="hicropl", **{"n_ctx": N, "depth": D, "cross_layer": K, **kw})
    return build_method(cfg, backbone, classes, dataset="demo")


def test_learned_prompts_placement_and_shapes(backbone, classes):
    model = _hicropl(backbone, classes)
    pr = model.prompts
    assert model.loss_terms == ("loss", "loss_cls", "loss_distill_text", "loss_distill_image")
    assert (len(pr.cross_prompts_text), len(pr.cross_prompts_visual)) == (D, D)
    assert (len(pr.text_proxy_token), len(pr.visual_proxy_token)) == (K, D - K)
    assert (len(pr.attn_pooling_text_nets), len(pr.attn_pooling_visual_nets)) == (K, D - K)
    p = model.compute_prompts()
    assert p.text.keys() == p.vision.keys() == set(range(D))
    # One member: every prompt carries the member axis first.
    assert all(t.shape == (1, N, 64) for t in p.text.values()) and all(v.shape == (1, N, 64) for v in p.vision.values())
    # Raw where the other modality is the source: text below k, vision from k on.
    assert all(p.text[l] is pr.cross_prompts_text[l] for l in range(K))
    assert all(p.vision[l] is pr.cross_prompts_visual[l] for l in range(K, D))
    # Mapped elsewhere, by the two mappers' equations.
    with torch.no_grad():
        proxies = torch.cat([pr.attn_pooling_text_nets[i](pr.text_proxy_token[i], pr.cross_prompts_text[i])
                             for i in range(K)], dim=1)
        assert proxies.shape == (1, K, 64)
        queries = torch.cat([pr.cross_prompts_visual[l] for l in range(K)], dim=1)
        mapped_v = pr.text2visual_net(queries, proxies).view(1, K, N, 64)
        vproxies = torch.cat([pr.attn_pooling_visual_nets[j](pr.visual_proxy_token[j], pr.cross_prompts_visual[K + j])
                              for j in range(D - K)], dim=1)
        queries = torch.cat([pr.cross_prompts_text[l] for l in range(K, D)], dim=1)
        mapped_t = pr.visual2text_net(queries, vproxies).view(1, D - K, N, 64)
        for l in range(K):
            torch.testing.assert_close(p.vision[l], mapped_v[:, l], atol=1e-6, rtol=0)
            assert (p.vision[l] - pr.cross_prompts_visual[l]).abs().max() > 1e-2
        for l in range(K, D):
            torch.testing.assert_close(p.text[l], mapped_t[:, l - K], atol=1e-6, rtol=0)
    # LKP by hand: LN_b(q + MHA(LN_a q, LN_a P, LN_a P)), and the attention is torch's MultiheadAttention's.
    lkp, q, prompt = pr.attn_pooling_text_nets[0], pr.text_proxy_token[0], pr.cross_prompts_text[0]
    a = lkp.attn(lkp.ln_1(q), lkp.ln_1(prompt), lkp.ln_1(prompt))
    torch.testing.assert_close(lkp(q, prompt), lkp.ln_2(q + a))
    mha = torch.nn.MultiheadAttention(64, lkp.attn.num_heads)
    mha.load_state_dict({k: v[0] for k, v in lkp.attn.state_dict().items()})
    x, kv = lkp.ln_1(q)[0], lkp.ln_1(prompt)[0]
    torch.testing.assert_close(a[0], mha(x, kv, kv, need_weights=False)[0], atol=1e-6, rtol=0)


def test_every_learned_parameter_gets_a_gradient(backbone, classes, images, labels):
    model = _hicropl(backbone, classes).train()
    model.forward_losses(images, labels)["loss"].backward()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    assert any("attn_pooling_visual_nets.0." in k for k in names) and any("visual2text_net." in k for k in names)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, k
    assert all(p.grad is None for p in backbone.model.parameters())


def test_prompts_depend_on_no_image(backbone, classes, images):
    model = _hicropl(backbone, classes).eval()
    with torch.no_grad():
        batch = model(images)
        for i in range(images.shape[0]):
            torch.testing.assert_close(model(images[i:i + 1])[0, 0], batch[0, i], atol=1e-5, rtol=0)


def test_teachers_mixing_and_loss(backbone, classes, images, labels, tmp_path):
    sentences = {c.replace("_", " "): [f"a {c} in the wild.", f"the {c}, close up."] for c in classes}
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(sentences))
    model = _hicropl(backbone, classes, descriptions=str(path), lambda_distill=3.0)
    with torch.no_grad():
        w = []
        for c in model.classnames:
            f = F.normalize(encode_text(backbone, backbone.tokenize(sentences[c])), dim=-1)
            w.append(F.normalize(f.mean(0), dim=-1))
        w = torch.stack(w)
        torch.testing.assert_close(model.teacher_text, w, atol=1e-6, rtol=0)
        p = model.compute_prompts()
        f_t = F.normalize(model._text_features(p)[0], dim=-1)
        f_v = F.normalize(encode_image(backbone, images, {l: v[0] for l, v in p.vision.items()}), dim=-1)
        g_v = F.normalize(encode_image(backbone, images), dim=-1)
        z_v, z_t = F.normalize(f_v + g_v, dim=-1), F.normalize(f_t + w, dim=-1)
        out = model.forward_losses(images, labels)
    out = {k: v[0] for k, v in out.items()}  # the one member
    torch.testing.assert_close(out["logits"], backbone.logit_scale * z_v @ z_t.t(), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["loss_cls"], F.cross_entropy(out["logits"], labels))
    torch.testing.assert_close(out["loss_distill_text"], 1 - F.cosine_similarity(z_t, w).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["loss_distill_image"], 1 - F.cosine_similarity(z_v, g_v).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["loss"], out["loss_cls"] + 3.0 * (out["loss_distill_text"] + out["loss_distill_image"]))
    assert out["loss_distill_text"] > 1e-3 and out["loss_distill_image"] > 1e-3


def test_text_teacher_is_computed_once_per_class_set(backbone, classes, novel, images, labels):
    model = _hicropl(backbone, classes)
    calls = []
    original = model.text_teacher
    model.text_teacher = lambda names, dataset: calls.append((tuple(names), dataset)) or original(names, dataset)
    base = model.teacher_text.clone()
    for _ in range(2):
        model.forward_losses(images, labels)["loss"].backward()
    assert calls == []  # never per step
    model.set_classnames(novel, dataset="demo")
    model.set_classnames(classes, dataset="demo")
    model.set_classnames(novel, dataset="other")
    assert calls == [(("sea turtle", "red fox"), "demo"), (("sea turtle", "red fox"), "other")]
    model.set_classnames(classes, dataset="demo")
    assert torch.equal(model.teacher_text, base)


def test_released_mapping_writes_back_and_trains_the_stored_prompts_only(backbone, classes, images, labels):
    model = _hicropl(backbone, classes, mapping="released", released_storage="shared").train()
    pr = model.prompts
    # As released: D visual prompt parameters over one storage, and one storage per side's proxy tokens.
    assert (len(pr.cross_prompts_visual), len(pr.text_proxy_token), len(pr.visual_proxy_token)) == (D, K, D - K)
    for plist in (pr.cross_prompts_visual, pr.text_proxy_token, pr.visual_proxy_token):
        assert len({id(p) for p in plist}) == len(plist)
        assert len({p.untyped_storage().data_ptr() for p in plist}) == 1
    assert not model.cache_text and model.forward_writes_params
    with torch.no_grad():
        # What the write-back will compute: text->vision first (shared storage keeps layer k-1's result) ...
        before_text = [t.clone() for t in pr.cross_prompts_text]
        mapped_v = pr.text_to_vision()
    out = model.forward_losses(images, labels)
    torch.testing.assert_close(pr.cross_prompts_visual[0], mapped_v[:, K - 1].detach(), atol=1e-6, rtol=0)
    with torch.no_grad():
        # ... then vision->text from the written visual prompt; early text prompts are untouched.
        tmp = _hicropl(backbone, classes, mapping="released", released_storage="shared")
        tmp.load_trainable_state_dict(model.trainable_state_dict())
        for l in range(K, D):
            tmp.prompts.cross_prompts_text[l].copy_(before_text[l])
        mapped_t = tmp.prompts.vision_to_text()
    for l in range(K):
        assert torch.equal(pr.cross_prompts_text[l], before_text[l])
    for l in range(K, D):
        torch.testing.assert_close(pr.cross_prompts_text[l], mapped_t[:, l - K], atol=1e-6, rtol=0)
    p = model.compute_prompts()
    assert all(p.vision[l] is pr.cross_prompts_visual[l] for l in range(D))  # each layer's own alias
    assert all(torch.equal(pr.cross_prompts_visual[l], pr.cross_prompts_visual[0]) for l in range(D))
    out["loss"].backward()
    for k, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        if k.startswith(("prompts.cross_prompts_text.", "prompts.cross_prompts_visual.")):
            assert prm.grad is not None and prm.grad.abs().sum() > 0, k
        else:  # proxies, LKPs, mappers: the released code gives them no gradient
            assert prm.grad is None, k


def test_released_evaluation_changes_the_prompts_batch_by_batch(backbone, classes, images):
    model = _hicropl(backbone, classes, mapping="released", released_storage="shared").eval()
    learned = _hicropl(backbone, classes).eval()
    with torch.no_grad():
        a, b = model(images), model(images)
        assert (a - b).abs().max() > 1e-4  # no cache hides the write-back
        assert torch.equal(learned(images), learned(images))


def test_bad_hicropl_config(backbone, classes):
    for k in (0, D):
        with pytest.raises(ConfigError, match=rf"method.cross_layer: k={k} outside 1..{D - 1}"):
            _hicropl(backbone, classes, cross_layer=k)
    with pytest.raises(PromptError, match=r"method.depth: 4 exceeds the model's 3 layers"):
        _hicropl(backbone, classes, depth=4)
    with pytest.raises(PromptError, match=r"method.lkp_heads: 5 heads do not divide the text width 64"):
        _hicropl(backbone, classes, lkp_heads=5)
    with pytest.raises(PromptError, match=r"method.mapper_heads: 3 heads do not divide the text width 64"):
        _hicropl(backbone, classes, mapper_heads=3)
    with pytest.raises(ConfigError, match=r"method.mapping: unknown value 'paper'; expected one of \['learned', 'released'\]"):
        _hicropl(backbone, classes, mapping="paper")
    with pytest.raises(ConfigError, match=r"method.released_storage: unknown value 'one'; expected one of \['shared', 'per_layer'\]"):
        _hicropl(backbone, classes, mapping="released", released_storage="one")
    with pytest.raises(ConfigError, match=r"method.released_storage: 'per_layer' applies to mapping 'released' only; got mapping 'learned'"):
        _hicropl(backbone, classes, released_storage="per_layer")
    # Defaults are the released base-to-novel settings.
    cfg = MethodConfig(name="hicropl")
    assert (cfg.depth, cfg.cross_layer, cfg.lambda_distill, cfg.mapping) == (12, 6, 12.0, "learned")
    assert MethodConfig(name="maple").depth == 9
    # `released` stores per layer by default (the released code as its trainer runs it on a GPU); unset otherwise.
    assert MethodConfig(name="hicropl", mapping="released").released_storage == "per_layer"
    assert cfg.released_storage is None
    with pytest.raises(ConfigError, match=r"method.cross_layer: k=6 outside 1..2"):
        MethodConfig(name="hicropl", depth=3).validate()
