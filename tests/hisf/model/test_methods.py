"""Methods: trainable sets, gradient flow, ablation switches, class-set changes, state dicts, fast path, training."""

from __future__ import annotations

import pytest
import torch

from hisf.config import BackboneConfig, ConfigError, MethodConfig
from hisf.model.backbone import load_backbone
from hisf.model.methods import build_method
from hisf.model.prompts import PromptError

TINY = dict(depth=2)


def _names(model):
    return sorted(k for k, p in model.named_parameters() if p.requires_grad)


def test_trainable_parameters_are_prompt_side(backbone, classes):
    n = {m: build_method(MethodConfig(name=m, **TINY), backbone, classes) for m in ("zeroshot", "coop", "maple", "hisf")}
    assert _names(n["zeroshot"]) == []
    assert _names(n["coop"]) == ["prompts.shared.0"]
    assert _names(n["maple"]) == [
        "prompts.shared.0", "prompts.shared.1",
        "prompts.vision_proj.0.bias", "prompts.vision_proj.0.weight",
        "prompts.vision_proj.1.bias", "prompts.vision_proj.1.weight",
    ]
    fusion = [f"fusion.{i}.{p}" for i in (0, 1) for p in
              ("k.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "norm.bias", "norm.weight", "q.weight", "v.weight")]
    assert _names(n["hisf"]) == sorted(fusion + ["label_embeddings.table"] + [
        f"prompts.{kind}.{i}.{p}" for kind in ("text_proj", "vision_proj") for i in (0, 1) for p in ("bias", "weight")
    ] + ["prompts.shared.0", "prompts.shared.1"])
    w, wv = 64, 64  # tiny text / vision widths, n_ctx 2 (16 for coop), 3 classes of 2+2+2 name tokens ("air" "liner")
    assert n["coop"].num_trainable() == 16 * w
    assert n["maple"].num_trainable() == 2 * (2 * w + w * wv + wv)
    per_layer = 2 * w + (w * w + w) + (w * wv + wv) + 3 * w * w + 2 * w + (2 * w * 64 + 64) + (64 * w + w)
    assert n["hisf"].num_trainable() == 2 * per_layer + 6 * w
    for m in n.values():
        groups = m.param_groups()
        assert sorted(groups) == ["fusion", "label_embeddings", "projections", "prompts"]
        assert sum(p.numel() for g in groups.values() for p in g) == m.num_trainable()


@pytest.mark.parametrize("method", ["coop", "maple", "hisf"])
def test_gradients_reach_prompts_only(backbone, classes, images, labels, method):
    model = build_method(MethodConfig(name=method, **TINY), backbone, classes)
    model.train()
    out = model.forward_losses(images, labels)
    out["loss"].sum().backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            # SF's MLP: its last layer starts at zero, so its first layer only gets gradient after one step;
            # W_v starts at zero (sf_zero_init), so the attention's query side (norm, W_q) and W_k do too.
            zero_at_init = any(s in name for s in (".mlp.0.", ".q.", ".k.", ".norm."))
            assert p.grad is not None and (p.grad.abs().sum() == 0) == zero_at_init, name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.zero_grad()
    model.forward_losses(images, labels)["loss"].sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.model.parameters())
    assert out["logits"].shape == (1, 4, 3) and out["loss"].shape == (1,)  # one member
    if method == "hisf":
        torch.testing.assert_close(out["loss"], out["loss_cls"] + out["loss_le"] + out["loss_sa"])
    else:
        assert set(out) == {"loss", "loss_cls", "logits"} and model.loss_terms == ("loss", "loss_cls")
        assert out["loss"].item() == out["loss_cls"].item()


def _hisf(backbone, classes, seed=0, **kw):
    torch.manual_seed(seed)
    return build_method(MethodConfig(name="hisf", **{**TINY, **kw}), backbone, classes)


def test_loss_switches_change_only_the_total(backbone, classes, images, labels):
    base = _hisf(backbone, classes).forward_losses(images, labels)
    assert base["loss_le"] > 0.01 and base["loss_sa"] > 0.01
    cases = {
        "lambda_le": (dict(lambda_le=0.0), lambda o: o["loss_cls"] + o["loss_sa"]),
        "lambda_sa": (dict(lambda_sa=2.5), lambda o: o["loss_cls"] + o["loss_le"] + 2.5 * o["loss_sa"]),
        "cls_loss": (dict(cls_loss=False), lambda o: o["loss_le"] + o["loss_sa"]),
    }
    for name, (kw, expected) in cases.items():
        out = _hisf(backbone, classes, **kw).forward_losses(images, labels)
        for k in ("logits", "loss_cls", "loss_le", "loss_sa"):
            torch.testing.assert_close(out[k], base[k], atol=0, rtol=0, msg=f"{name} changed {k}")
        torch.testing.assert_close(out["loss"], expected(out), msg=name)
        assert (out["loss"] - base["loss"]).abs() > 1e-3, name


def test_module_switches(backbone, classes, images, labels):
    full = _hisf(backbone, classes)
    no_sf = _hisf(backbone, classes, sf=False)
    no_pi = _hisf(backbone, classes, pi=False)
    shared = _hisf(backbone, classes, share_fusion=True)
    frozen = _hisf(backbone, classes, label_embedding="frozen")
    names = set(_names(full))
    assert set(_names(no_sf)) == {k for k in names if not k.startswith("fusion.")}
    assert set(_names(no_pi)) == {k for k in names if "proj" not in k} | {"prompts.vision.0", "prompts.vision.1"}
    assert set(_names(shared)) == {k for k in names if not k.startswith("fusion.1.")}
    assert set(_names(frozen)) == names - {"label_embeddings.table"}
    # Same seed, same draws: without SF the prompts are P_s itself; with the zero-initialised MLP, SF adds attention
    # only (nonzero with sf_zero_init false; zero with the default W_v = 0).
    nonzero = _hisf(backbone, classes, sf_zero_init=False)
    finals_full, means = nonzero.compute_prompts().aux
    finals_nosf, _ = no_sf.compute_prompts().aux
    for a, b in zip(full.compute_prompts().aux[0], finals_nosf):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for i, (a, b) in enumerate(zip(finals_full, finals_nosf)):
        fusion = nonzero.fusion[i]
        q = fusion.q(fusion.norm(b))[0].view(2, 8, 8).transpose(0, 1)
        k = fusion.k(means)[0].view(3, 8, 8).transpose(0, 1)
        v = fusion.v(means)[0].view(3, 8, 8).transpose(0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1) @ v
        torch.testing.assert_close(a[0], b[0] + attn.transpose(0, 1).reshape(2, 64), atol=1e-6, rtol=0)
    # w/o PI: text prompts are the free P_t (no W_t), vision prompts are free P_v
    p = no_pi.compute_prompts()
    text, vision = p.text, p.vision
    assert text.keys() == vision.keys() == {0, 1}
    assert vision[1] is no_pi.prompts.vision[1]


def test_hisf_without_sf_starts_where_maple_starts(backbone, classes, images):
    """With W_t = I at init and E_c = the name's token embeddings, HISF w/o SF computes MaPLe's logits."""
    maple = build_method(MethodConfig(name="maple", **TINY), backbone, classes)
    hisf = _hisf(backbone, classes, sf=False)
    sd = hisf.trainable_state_dict()
    sd.update({k: v for k, v in maple.trainable_state_dict().items()})
    hisf.load_trainable_state_dict(sd)
    torch.testing.assert_close(hisf(images), maple(images), atol=1e-5, rtol=0)
    with torch.no_grad():
        # a random (not constant: LayerNorm removes constant shifts) change of one name token's embedding
        hisf.label_embeddings.table[0, 0] += torch.randn(64)
    assert (hisf(images) - maple(images)).abs().max() > 1e-4


def test_class_set_changes(backbone, classes, novel, images, labels):
    model = _hisf(backbone, classes)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model.forward_losses(images, labels)["loss"].sum().backward()
        opt.step()
    model.eval()
    trained = model.trainable_state_dict()
    with torch.no_grad():
        base_logits = model(images)
        model.set_classnames(novel)
        novel_logits = model(images)
        init_e = backbone.token_embeddings(backbone.bpe("sea turtle") + backbone.bpe("red fox"))
        torch.testing.assert_close(model.label_embeddings.table[0], init_e, atol=0, rtol=0)
        assert novel_logits.shape == (1, 4, 2)
        for k, v in model.trainable_state_dict().items():
            if k != "label_embeddings.table":
                assert torch.equal(v, trained[k]), k  # the same trained prompts evaluate the new classes
        model.set_classnames(classes)
        torch.testing.assert_close(model(images), base_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.label_embeddings.table[0], trained["label_embeddings.table"])
    # a fresh model loading the exported weights gives the same logits
    fresh = _hisf(backbone, classes, seed=5)
    fresh.load_trainable_state_dict(trained)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), base_logits, atol=1e-6, rtol=0)


def test_eval_cache_follows_parameter_updates(backbone, classes, images):
    model = _hisf(backbone, classes).eval()
    with torch.no_grad():
        a = model(images)
        assert torch.equal(model(images), a)
        model.prompts.shared[0].add_(0.5)
        b = model(images)
    assert (a - b).abs().max() > 1e-4
    # grad-enabled path recomputes; ~1 ulp of a τ-scaled logit apart from the cached no-grad result
    torch.testing.assert_close(b, model(images), atol=1e-5, rtol=0)


def test_fast_path_equals_plain_path(backbone, tiny_ckpt, classes, images, labels):
    plain = _hisf(backbone, classes)
    plain.truncate_text = False
    fast = _hisf(backbone, classes)
    out_plain, out_fast = plain.forward_losses(images, labels), fast.forward_losses(images, labels)
    for k in ("logits", "loss", "loss_cls", "loss_le", "loss_sa"):
        torch.testing.assert_close(out_fast[k], out_plain[k], atol=1e-5, rtol=0)
    half_bb = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=str(tiny_ckpt), precision="fp16"))
    half = build_method(MethodConfig(name="hisf", **TINY), half_bb, classes)
    half.load_trainable_state_dict(plain.trainable_state_dict())
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
    out_half = half.forward_losses(images, labels)
    out_half["loss"].sum().backward()
    assert half.prompts.shared[0].grad.dtype == torch.float32
    for k in ("logits", "loss", "loss_cls", "loss_le", "loss_sa"):
        torch.testing.assert_close(out_half[k], out_plain[k], atol=2e-2 * max(1.0, out_plain[k].abs().max().item()), rtol=0)


def test_bad_method_inputs(backbone, classes):
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'prompt-magic'; expected one of \['coop', 'hicropl', 'hisf', 'maple', 'zeroshot'\]"):
        build_method(MethodConfig(name="prompt-magic"), backbone, classes)
    with pytest.raises(PromptError, match=r"method.n_ctx: 80 does not fit; expected 1..73"):
        build_method(MethodConfig(name="maple", n_ctx=80, depth=1), backbone, classes)
    with pytest.raises(PromptError, match=r"n_ctx: 73 .*'golden retriever' need 78 .*context length is 77"):
        build_method(MethodConfig(name="coop", n_ctx=73), backbone, classes)
    with pytest.raises(PromptError, match=r"method.depth: 4 exceeds the model's 3 layers"):
        build_method(MethodConfig(name="hisf", depth=4), backbone, classes)
    with pytest.raises(PromptError, match=r"prompt layers \[1, 5\] outside the model; expected indices in 0..2"):
        build_method(MethodConfig(name="hisf", layers=(1, 5)), backbone, classes)
    with pytest.raises(PromptError, match="class list is empty"):
        build_method(MethodConfig(name="hisf", **TINY), backbone, [])
    with pytest.raises(PromptError, match=r"'tabby_cat' \(index 2\) duplicates index 1"):
        build_method(MethodConfig(name="hisf", **TINY), backbone, ["dog", "tabby cat", "tabby_cat"])
    model = build_method(MethodConfig(name="maple", **TINY), backbone, classes)
    sd = model.trainable_state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['prompts.shared.1'\]"):
        model.load_trainable_state_dict({k: v for k, v in sd.items() if k != "prompts.shared.1"})
    with pytest.raises(ValueError, match=r"'prompts.shared.0' has shape \(3, 64\); expected \(2, 64\)"):
        model.load_trainable_state_dict({**sd, "prompts.shared.0": torch.zeros(3, 64)})
    with pytest.raises(PromptError, match="template"):
        build_method(MethodConfig(name="zeroshot"), backbone, classes, template="a photo")


def test_zeroshot_uses_the_template(backbone, classes, images):
    model = build_method(MethodConfig(name="zeroshot"), backbone, classes, template="itap of a {}.")
    with torch.no_grad():
        ids = backbone.tokenize([f"itap of a {c.replace('_', ' ')}." for c in classes])
        txt = torch.nn.functional.normalize(backbone.model.encode_text(ids), dim=-1)
        img = torch.nn.functional.normalize(backbone.model.encode_image(images), dim=-1)
        torch.testing.assert_close(model(images)[0], backbone.logit_scale * img @ txt.t(), atol=1e-5, rtol=0)
