"""Our `hicropl` with `mapping: released`, after importing a released-format Dassl checkpoint, equals the released code.

The fixture checkpoint is the state dict of benchmarks/hicropl_reference.py's re-implementation of the released
CustomCLIP on the tiny random-weight CLIP, written as `VLPromptLearner/model.pth.tar-1`.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.hicropl_reference import (
    ReferenceHiCroPL,
    dassl_optimizer,
    reference_from_backbone,
    save_dassl_checkpoint,
)
from hisf.config import MethodConfig
from hisf.model.descriptions import resolve_descriptions
from hisf.model.hicropl_import import HiCroPLImportError, import_hicropl_prompts, read_hicropl_state_dict
from hisf.model.methods import build_method

N_CTX, DEPTH, K = 2, 3, 1


@pytest.fixture
def descriptions(tmp_path, classes):
    """A CoPrompt-style folder for a custom dataset `pets3`, 2-3 sentences per class (keys spelled differently)."""
    table = {"Golden Retriever": ["a dog with a golden coat.", "a large friendly retriever."],
             "tabby_cat": ["a striped domestic cat.", "a cat with an M on its forehead.", "a grey tabby."],
             "airliner": ["a large passenger aeroplane.", "a jet with many windows."],
             "sea turtle": ["a turtle swimming in the ocean."], "Red Fox": ["a small orange fox.", "a fox in snow."]}
    (tmp_path / "pets3_prompt.json").write_text(json.dumps(table))
    return str(tmp_path)


def released_reference(backbone, classes, descriptions, dtype=torch.float32, seed=0, n_ctx=N_CTX, depth=DEPTH,
                       k=K) -> ReferenceHiCroPL:
    """The released model on the tiny CLIP, its prompt learner moved off its init (every net away from a clone)."""
    torch.manual_seed(seed)
    ref = reference_from_backbone(backbone, classes, resolve_descriptions(descriptions, "pets3", classes),
                                  n_ctx=n_ctx, depth=depth, cross_layer=k, dtype=dtype)
    with torch.no_grad():
        for name, p in ref.prompt_learner.named_parameters():
            if not name.startswith("ZS_image_encoder."):
                p.add_(0.1 * torch.randn_like(p))
    return ref


def hicropl(backbone, classes, descriptions, n_ctx=N_CTX, depth=DEPTH, k=K):
    cfg = MethodConfig(name="hicropl", n_ctx=n_ctx, depth=depth, cross_layer=k, mapping="released",
                       released_storage="shared", descriptions=descriptions)
    return build_method(cfg, backbone, classes, dataset="pets3")


def batches():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]


def test_checkpoint_keys_are_the_released_ones(backbone, classes, descriptions, tmp_path):
    ref = released_reference(backbone, classes, descriptions)
    path = save_dassl_checkpoint(ref, tmp_path / "out", epoch=1)
    assert path == tmp_path / "out" / "VLPromptLearner" / "model.pth.tar-1"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1
    sd = ckpt["state_dict"]
    for key in ["prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix",
                "prompt_learner.text2visual_net.linear_q.weight", "prompt_learner.visual2text_net.ffn.c_proj.bias",
                "prompt_learner.attn_pooling_text_nets.0.attn.in_proj_weight",
                "prompt_learner.attn_pooling_visual_nets.1.ln_2.bias", "prompt_learner.ZS_image_encoder.conv1.weight",
                "image_encoder.proj", "text_encoder.text_projection", "logit_scale"]:
        assert key in sd, key
    assert sum(k.startswith("prompt_learner.cross_prompts_text.") for k in sd) == DEPTH
    assert sum(k.startswith("prompt_learner.cross_prompts_visual.") for k in sd) == DEPTH
    assert sum(k.startswith("prompt_learner.text_proxy_token.") for k in sd) == K
    assert sum(k.startswith("prompt_learner.visual_proxy_token.") for k in sd) == DEPTH - K
    # The released sharing: one storage for the visual prompts and for each side's proxy tokens; ctx is text prompt 0.
    pl = ref.prompt_learner
    assert len({p.data_ptr() for p in pl.cross_prompts_visual}) == 1
    assert len({p.data_ptr() for p in pl.visual_proxy_token}) == 1
    assert pl.ctx is pl.cross_prompts_text[0]
    assert len({p.data_ptr() for p in pl.cross_prompts_text}) == DEPTH


# n_ctx 2 starts from "a photo of a"'s tokens; n_ctx 6 from "X X X X X X" (the released n_ctx <= 4 rule).
@pytest.mark.parametrize("n_ctx, depth, k", [(2, 3, 1), (6, 3, 2)])
def test_logits_and_loss_equal_the_released_code(backbone, classes, descriptions, tmp_path, n_ctx, depth, k):
    ref = released_reference(backbone, classes, descriptions, n_ctx=n_ctx, depth=depth, k=k)
    path = save_dassl_checkpoint(ref, tmp_path, epoch=1)
    model = hicropl(backbone, classes, descriptions, n_ctx=n_ctx, depth=depth, k=k)
    x1, x2 = batches()
    model.eval()
    with torch.no_grad():
        before = model(x1)[0]
    import_hicropl_prompts(model, path)
    # The text teachers agree (descriptions matched to the class names, mean of normalised sentence features).
    torch.testing.assert_close(model.teacher_text, ref.fixed_embeddings, atol=1e-6, rtol=0)

    ref.eval()
    stored = ref.prompt_learner.cross_prompts_visual[0].detach().clone()
    with torch.no_grad():
        ours = [model(x1)[0], model(x2)[0]]
        theirs = [ref(x1), ref(x2)]
    assert (before - ours[0]).abs().max() > 1e-3  # the import changed the prompts
    for a, b in zip(ours, theirs):
        assert a.shape == (4, len(classes))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Evaluation rewrote the prompts: the stored visual prompt moved, and batch 1 again gives other logits.
    assert (ref.prompt_learner.cross_prompts_visual[0] - stored).abs().max() > 1e-3
    with torch.no_grad():
        again = model(x1)[0]
        torch.testing.assert_close(again, ref(x1), atol=1e-5, rtol=0)
    assert (again - ours[0]).abs().max() > 1e-4

    # The training loss (and every term) after those forwards, and its gradient's reach.
    model.train()
    ref.train()
    labels = torch.tensor([0, 1, 2, 1])
    out = model.forward_losses(x2, labels)
    want = ref(x2, labels)
    assert tuple(model.loss_terms) == ("loss", "loss_cls", "loss_distill_text", "loss_distill_image")
    for term in model.loss_terms:
        torch.testing.assert_close(out[term][0], want[term], atol=2e-5, rtol=0)
    assert want["loss_distill_text"] > 1e-2 and want["loss_distill_image"] > 2e-4
    # The comparison sees the text side too: moving a deep text prompt of the reference changes its logits.
    ref.eval()
    model.eval()
    with torch.no_grad():
        ref.prompt_learner.cross_prompts_text[k - 1].add_(torch.randn_like(ref.prompt_learner.cross_prompts_text[k - 1]))
        assert (ref(x1) - model(x1)[0]).abs().max() > 1e-3


def test_novel_classes_after_import_equal_the_released_code_rebuilt_on_them(backbone, classes, novel, descriptions,
                                                                           tmp_path):
    """Base-to-novel as the released code runs it: a model built on the novel classes loads the base checkpoint."""
    path = save_dassl_checkpoint(released_reference(backbone, classes, descriptions), tmp_path)
    model = hicropl(backbone, classes, descriptions)
    import_hicropl_prompts(model, path)
    model.set_classnames(novel, dataset="pets3")
    torch.manual_seed(5)
    ref = reference_from_backbone(backbone, novel, resolve_descriptions(descriptions, "pets3", novel),
                                  n_ctx=N_CTX, depth=DEPTH, cross_layer=K)
    sd = read_hicropl_state_dict(path)[1]
    missing, unexpected = ref.load_state_dict(
        {key: v for key, v in sd.items() if key not in ("prompt_learner.token_prefix", "prompt_learner.token_suffix")},
        strict=False)
    assert sorted(missing) == ["prompt_learner.token_prefix", "prompt_learner.token_suffix"] and unexpected == []
    torch.testing.assert_close(model.teacher_text, ref.fixed_embeddings, atol=1e-6, rtol=0)
    assert model.teacher_text.shape == (2, backbone.model.text_projection.shape[1])
    model.eval()
    ref.eval()
    with torch.no_grad():
        for x in batches():
            torch.testing.assert_close(model(x)[0], ref(x), atol=1e-5, rtol=0)


def test_fp16_checkpoint_imports_and_matches_within_half_precision(backbone, classes, descriptions, tmp_path):
    ref = released_reference(backbone, classes, descriptions, dtype=torch.float16)
    sd = torch.load(save_dassl_checkpoint(ref, tmp_path), weights_only=True)["state_dict"]
    assert sd["prompt_learner.cross_prompts_visual.0"].dtype == torch.float16
    assert sd["prompt_learner.ZS_image_encoder.conv1.weight"].dtype == torch.float16
    assert sd["prompt_learner.ZS_image_encoder.ln_pre.weight"].dtype == torch.float32  # convert_weights skips LNs
    model = hicropl(backbone, classes, descriptions)
    import_hicropl_prompts(model, tmp_path / "VLPromptLearner" / "model.pth.tar-1")
    assert model.prompts.cross_prompts_visual[0].dtype == torch.float32
    x1, x2 = batches()
    model.eval()
    ref.eval()
    with torch.no_grad():
        for x in (x1, x2):
            a, b = model(x)[0], ref(x)
            assert b.dtype == torch.float16
            torch.testing.assert_close(a, b.float(), atol=3e-2, rtol=0)


def test_import_errors(backbone, classes, descriptions, tmp_path):
    ref = released_reference(backbone, classes, descriptions)
    good = ref.state_dict()
    model = hicropl(backbone, classes, descriptions)
    before = model.trainable_state_dict()

    def bad(edit):
        sd = dict(good)
        edit(sd)
        return {"state_dict": sd, "epoch": 1}

    with pytest.raises(HiCroPLImportError, match=r"missing keys \['prompt_learner.text2visual_net.ln_1.bias'\]"):
        import_hicropl_prompts(model, bad(lambda sd: sd.pop("prompt_learner.text2visual_net.ln_1.bias")))
    with pytest.raises(HiCroPLImportError, match=r"unexpected keys \['prompt_learner.extra'\]"):
        import_hicropl_prompts(model, bad(lambda sd: sd.update({"prompt_learner.extra": torch.zeros(1)})))
    with pytest.raises(HiCroPLImportError,
                       match=r"'prompt_learner.visual2text_net.linear_k.weight' has shape \(64, 65\); expected \(64, 64\)"):
        import_hicropl_prompts(model, bad(lambda sd: sd.update(
            {"prompt_learner.visual2text_net.linear_k.weight": torch.zeros(64, 65)})))
    with pytest.raises(HiCroPLImportError, match=r"cross_prompts_visual.2' differs from 'prompt_learner.cross_prompts_visual.0'"):
        import_hicropl_prompts(model, bad(lambda sd: sd.update(
            {"prompt_learner.cross_prompts_visual.2": good["prompt_learner.cross_prompts_visual.2"] + 1})))
    # The frozen teacher and encoders must be our backbone's weights: checked, never loaded.
    with pytest.raises(HiCroPLImportError, match=r"frozen CLIP key 'prompt_learner.ZS_image_encoder.proj' differs "
                                                     r"from the backbone's 'visual.proj'"):
        import_hicropl_prompts(model, bad(lambda sd: sd.update(
            {"prompt_learner.ZS_image_encoder.proj": good["prompt_learner.ZS_image_encoder.proj"] * 1.01})))
    with pytest.raises(HiCroPLImportError, match=r"'text_encoder.ln_final.weight' differs from the backbone's 'ln_final.weight'"):
        import_hicropl_prompts(model, bad(lambda sd: sd.update(
            {"text_encoder.ln_final.weight": good["text_encoder.ln_final.weight"] + 1e-3})))
    with pytest.raises(HiCroPLImportError, match=r"'image_encoder.conv1.weight' .* no match in the backbone"):
        import_hicropl_prompts(model, bad(lambda sd: sd.update({"image_encoder.conv1.weight": torch.zeros(64, 3, 16, 16)})))
    with pytest.raises(HiCroPLImportError, match="not found"):
        import_hicropl_prompts(model, tmp_path / "VLPromptLearner" / "model.pth.tar-9")
    (tmp_path / "junk.pth.tar-1").write_text("not a checkpoint")
    with pytest.raises(HiCroPLImportError, match=r"junk.pth.tar-1: not a HiCroPL checkpoint we load: it is not a torch file"):
        import_hicropl_prompts(model, tmp_path / "junk.pth.tar-1")
    # Dassl pickles its warm-up scheduler's successor (a torch scheduler object) into the same file.
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    scheduler = {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5), "last_epoch": 1}
    torch.save({"state_dict": good, "epoch": 1, "scheduler": scheduler}, tmp_path / "dassl.pth.tar-1")
    with pytest.raises(HiCroPLImportError, match=r"dassl.pth.tar-1: not a HiCroPL checkpoint we load: it holds a pickled "
                       r"Python object \(torch.optim.lr_scheduler.CosineAnnealingLR\).*keep only the weights") as err:
        import_hicropl_prompts(model, tmp_path / "dassl.pth.tar-1")
    assert "weights_only=False" not in str(err.value)
    with pytest.raises(HiCroPLImportError, match=r"no 'prompt_learner.\*' keys"):
        read_hicropl_state_dict({"state_dict": {"image_encoder.proj": torch.zeros(1)}})
    # A failed import leaves the model's prompts untouched.
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kw, message", [
    (dict(depth=2), r"method.depth: .* has HiCroPL prompt depth 3 .*; the model's depth is 2"),
    (dict(cross_layer=2), r"method.cross_layer: .* has cross layer k=1 .*; the model's cross_layer is 2"),
    (dict(n_ctx=4), r"'prompt_learner.ctx' has shape \(2, 64\); expected \(4, 64\) \(n_ctx=4"),
    (dict(mapping="learned"), r"import into method 'hicropl' with mapping 'released'; got method 'hicropl', mapping 'learned'"),
])
def test_checkpoint_from_another_setting(backbone, classes, descriptions, tmp_path, kw, message):
    path = save_dassl_checkpoint(released_reference(backbone, classes, descriptions), tmp_path)
    cfg = dict(name="hicropl", n_ctx=N_CTX, depth=DEPTH, cross_layer=K, mapping="released", released_storage="shared",
               descriptions=descriptions)
    cfg.update(kw)
    if cfg["mapping"] != "released":
        cfg.pop("released_storage")
    model = build_method(MethodConfig(**cfg), backbone, classes, dataset="pets3")
    with pytest.raises(HiCroPLImportError, match=message):
        import_hicropl_prompts(model, path)


def test_released_adam_adds_one_update_per_layer_to_the_shared_visual_prompt(backbone, classes, descriptions):
    """Dassl's Adam sees D visual-prompt parameters over one storage: a step adds D per-layer Adam updates."""
    ref = released_reference(backbone, classes, descriptions)
    ref.train()
    opt = dassl_optimizer(ref, lr=0.0025, weight_decay=0.0)
    x1, _ = batches()
    loss = ref(x1, torch.tensor([0, 1, 2, 1]))["loss"]
    visual = list(ref.prompt_learner.cross_prompts_visual)
    before = visual[0].detach().clone()  # after the forward's write-back
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in visual]
    assert all(g.abs().max() > 0 for g in grads)
    assert ref.prompt_learner.text2visual_net.linear_q.weight.grad is None  # no gradient through the write-back
    opt.step()
    eps, lr = 1e-3, 0.0025
    # Adam's first step is lr * g / (|g| + eps) per parameter (bias-corrected moments m = g, v = g^2).
    per_layer = sum(lr * g / (g.abs() + eps) for g in grads)
    torch.testing.assert_close(visual[0].detach(), before - per_layer, atol=1e-7, rtol=1e-5)
    one_param = lr * sum(grads) / (sum(grads).abs() + eps)
    # Not the step of one parameter holding the summed gradient (the two agree only where |g| << eps).
    assert (per_layer - one_param).abs().max() > 5e-4  # 1e-3 here, as large as the step itself


def _member_state(model, cfg, drop=()):
    """The one member's TrialState: the preset's optimiser over its views (as the engine builds it), leaving out the
    stacked parameters in `drop`."""
    from hisf.engine.checkpoint import TrialState
    from hisf.engine.optim import build_optimizer, build_scheduler, member_views

    groups, pairs = member_views(model, 0)
    keep = [(p, v) for p, v in pairs if not any(p is d for d in drop)]
    views = {id(v) for _, v in keep}
    opt = build_optimizer(cfg, {g: [v for v in vs if id(v) in views] for g, vs in groups.items()})
    stacked = {id(v): p for p, v in keep}
    ordered = [(stacked[id(v)], v) for g in opt.param_groups for v in g["params"]]
    return TrialState(model, opt, build_scheduler(opt, cfg), member=0, pairs=ordered)


def _engine_steps(model, state, xs, labels):
    """Our engine's training step (fp32, one rank) on each batch; the loss terms of each step."""
    from hisf.engine.distributed import DistEnv
    from hisf.engine.step import resolve_precision, train_step

    env, precision = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False), resolve_precision("fp32", torch.device("cpu"))
    out = []
    for x in xs:
        (res,) = train_step(model, x, labels, [state], precision, env)
        assert not res.skipped
        out.append(res.losses)
    return out


def _reference_steps(ref, optimizer, xs, labels):
    out = []
    for x in xs:
        terms = ref(x, labels)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        out.append({k: float(v.detach()) for k, v in terms.items() if k != "logits"})
    return out


def _assert_prompts_equal(model, ref, atol):
    pl, pr = ref.prompt_learner, model.prompts
    for name in ("cross_prompts_text", "cross_prompts_visual", "text_proxy_token", "visual_proxy_token"):
        for i, (a, b) in enumerate(zip(getattr(pr, name), getattr(pl, name), strict=True)):
            torch.testing.assert_close(a.detach()[0], b.detach(), atol=atol, rtol=0, msg=lambda m: f"{name}.{i}: {m}")


@pytest.mark.parametrize("steps", [1, 3])
def test_hicropl_preset_steps_equal_the_released_dassl_adam(backbone, classes, descriptions, tmp_path, steps):
    """Our `released` model with the `hicropl` preset trains as the released code's Dassl Adam does (D = 3)."""
    from hisf.config import TrainConfig

    ref = released_reference(backbone, classes, descriptions)
    model = hicropl(backbone, classes, descriptions)
    import_hicropl_prompts(model, save_dassl_checkpoint(ref, tmp_path))
    # warm-up off: the schedule sets the lr it is built with, and Dassl's optimiser here has none
    state = _member_state(model, TrainConfig(preset="hicropl", warmup_epochs=0))
    opt = state.optimizer
    # Every alias is its own optimiser entry, as in Dassl's Adam over model.parameters(); updated one by one.
    # (`ctx` is the same object as `cross_prompts_text.0`: one entry in both.)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        1 for n, _ in ref.prompt_learner.named_parameters() if not n.startswith("ZS_image_encoder."))
    assert opt.defaults["foreach"] is False and opt.param_groups[0]["weight_decay"] == 5e-4
    ref_opt = dassl_optimizer(ref)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(steps)]
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    ref.train()
    start = model.prompts.cross_prompts_visual[0].detach().clone()
    ours, theirs = _engine_steps(model, state, xs, labels), _reference_steps(ref, ref_opt, xs, labels)
    for a, b in zip(ours, theirs, strict=True):
        for term in model.loss_terms:
            assert a[term] == pytest.approx(b[term], abs=2e-5), term
    _assert_prompts_equal(model, ref, atol=1e-5)
    pr = model.prompts
    assert len({p.untyped_storage().data_ptr() for p in pr.cross_prompts_visual}) == 1  # still one storage
    # The steps are D Adam updates on the shared values (~D * lr per element on the first step), not one.
    moved = (pr.cross_prompts_visual[0].detach() - start).abs().mean()
    assert moved > 2 * 0.0025 if steps == 1 else moved > 0.0025


def test_one_parameter_for_the_shared_visual_prompt_would_train_otherwise(backbone, classes, descriptions, tmp_path):
    """The test above can fail: Adam over one visual prompt parameter (one update from the summed gradient) differs."""
    from hisf.config import TrainConfig

    ref = released_reference(backbone, classes, descriptions)
    model = hicropl(backbone, classes, descriptions)
    import_hicropl_prompts(model, save_dassl_checkpoint(ref, tmp_path))
    state = _member_state(model, TrainConfig(preset="hicropl", warmup_epochs=0),
                          drop=(model.prompts.cross_prompts_visual[1], model.prompts.cross_prompts_visual[2]))
    x = batches()[0]
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    ref.train()
    _engine_steps(model, state, [x], labels)
    _reference_steps(ref, dassl_optimizer(ref), [x], labels)
    diff = (model.prompts.cross_prompts_visual[0] - ref.prompt_learner.cross_prompts_visual[0]).abs().max()
    assert diff > 1e-3


def test_shared_storage_survives_conversion_which_unties_the_released_code(backbone, classes, descriptions, tmp_path):
    """`Module.to` converts each parameter on its own: the released model's aliases come apart (as on `.to("cuda")`),
    ours are re-tied, so one config trains alike on every device; a per-layer-storage model imports that state."""
    ref = released_reference(backbone, classes, descriptions)
    ref.double().float()  # exact round trip; the same per-parameter copy as a device move
    pl = ref.prompt_learner
    assert len({p.untyped_storage().data_ptr() for p in pl.cross_prompts_visual}) == DEPTH
    model = hicropl(backbone, classes, descriptions)
    model.double().float()
    pr = model.prompts
    for plist in (pr.cross_prompts_visual, pr.text_proxy_token, pr.visual_proxy_token):
        assert len({p.untyped_storage().data_ptr() for p in plist}) == 1
    with torch.no_grad():
        pr.cross_prompts_visual[2].add_(1.0)
    assert torch.equal(pr.cross_prompts_visual[0], pr.cross_prompts_visual[2])

    # Trained untied, the released visual prompts differ per layer: a shared model refuses them, a per-layer one
    # (the released code as it runs on a GPU) imports them and trains as it does.
    x1, x2 = batches()
    labels = torch.tensor([0, 1, 2, 1])
    ref.train()
    _reference_steps(ref, dassl_optimizer(ref), [x1], labels)
    assert not torch.equal(pl.cross_prompts_visual[0], pl.cross_prompts_visual[DEPTH - 1])
    path = save_dassl_checkpoint(ref, tmp_path)
    with pytest.raises(HiCroPLImportError,
                       match=r"cross_prompts_visual.\d' differs .* needs method.released_storage: per_layer"):
        import_hicropl_prompts(model, path)
    cfg = MethodConfig(name="hicropl", n_ctx=N_CTX, depth=DEPTH, cross_layer=K, mapping="released",
                       released_storage="per_layer", descriptions=descriptions)
    model = build_method(cfg, backbone, classes, dataset="pets3")
    assert len({p.untyped_storage().data_ptr() for p in model.prompts.cross_prompts_visual}) == DEPTH
    import_hicropl_prompts(model, path)
    from hisf.config import TrainConfig

    state = _member_state(model, TrainConfig(preset="hicropl", warmup_epochs=0))
    assert state.optimizer.defaults["foreach"] is True  # nothing aliased: the multi-tensor implementation
    model.train()
    ours, theirs = _engine_steps(model, state, [x2], labels), _reference_steps(ref, dassl_optimizer(ref), [x2], labels)
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], abs=2e-5)
    _assert_prompts_equal(model, ref, atol=1e-5)


def test_resume_keeps_the_aliases_and_their_adam_states(backbone, classes, descriptions, tmp_path):
    """A checkpoint (trainable state + optimiser state, as the engine saves them) resumes the released training exactly."""
    from hisf.config import TrainConfig

    def fresh(seed):
        torch.manual_seed(seed)
        m = hicropl(backbone, classes, descriptions).train()
        return m, _member_state(m, TrainConfig(preset="hicropl", warmup_epochs=0))

    x1, x2 = batches()
    labels = torch.tensor([0, 1, 2, 1])
    model, mstate = fresh(0)
    _engine_steps(model, mstate, [x1], labels)
    torch.save({"trainable": model.trainable_state_dict(), "optimizer": mstate.optimizer.state_dict()},
               tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert sum(k.startswith("prompts.cross_prompts_visual.") for k in state["trainable"]) == DEPTH
    resumed, rstate = fresh(1)
    ropt = rstate.optimizer
    assert not torch.equal(resumed.prompts.cross_prompts_visual[0], model.prompts.cross_prompts_visual[0])
    resumed.load_trainable_state_dict(state["trainable"])
    ropt.load_state_dict(state["optimizer"])
    pr = resumed.prompts
    for plist in (pr.cross_prompts_visual, pr.text_proxy_token, pr.visual_proxy_token):
        assert len({p.untyped_storage().data_ptr() for p in plist}) == 1  # copied into the storage, still shared
    # Each alias got its own moment estimates back (they differ: one per layer's gradient).
    moments = [ropt.state[v]["exp_avg"] for q in pr.cross_prompts_visual for p, v in rstate.pairs if p is q]
    assert len(moments) == DEPTH and not torch.equal(moments[0], moments[DEPTH - 1])
    a, b = _engine_steps(model, mstate, [x2], labels), _engine_steps(resumed, rstate, [x2], labels)
    assert a == b
    for (k, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), k
    # A state dict that gives aliases different values cannot load into one storage.
    bad = dict(state["trainable"])
    bad["prompts.cross_prompts_visual.2"] = bad["prompts.cross_prompts_visual.2"] + 1
    with pytest.raises(ValueError, match=r"'prompts.cross_prompts_visual.2' differs from 'prompts.cross_prompts_visual.0'"):
        resumed.load_trainable_state_dict(bad)
