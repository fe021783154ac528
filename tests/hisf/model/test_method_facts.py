"""Each method's facts are declared once (hisf/model/facts.py): builders, config defaults and run lines read them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hisf.config import ConfigError, MethodConfig, TrialConfig
from hisf.model.facts import METHODS, PARAM_GROUPS
from hisf.presets import PRESETS
from tests.support import ROOT


def test_every_declared_method_has_a_builder_and_back():
    from hisf.model.methods import BUILDERS

    assert sorted(BUILDERS) == sorted(METHODS) == ["coop", "hicropl", "hisf", "maple", "zeroshot"]


def test_the_config_reads_the_facts_without_torch():
    code = ("import sys; import hisf.config, hisf.model.facts, hisf.presets; "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unset_depth_and_n_ctx_take_the_methods_declared_defaults(name, backbone, classes):
    from hisf.model.methods import build_method

    assert MethodConfig(name=name).depth == METHODS[name].depth
    assert TrialConfig.from_dict({"method": {"name": name}}).flatten()["method.depth"] == METHODS[name].depth
    model = build_method(MethodConfig(name=name, depth=2, cross_layer=1), backbone, classes)
    assert model.n_ctx == METHODS[name].n_ctx
    assert set(model.param_groups()) == set(PARAM_GROUPS)


def test_depth_defaults_as_the_papers_say():
    assert {n: m.depth for n, m in METHODS.items() if n in ("maple", "hisf", "hicropl")} == {
        "maple": 9, "hisf": 9, "hicropl": 12}
    assert {n: m.n_ctx for n, m in METHODS.items()} == {"zeroshot": 0, "coop": 16, "maple": 2, "hisf": 2, "hicropl": 16}


def test_preset_choices_come_from_the_preset_table():
    assert sorted(PRESETS) == ["adamw", "hicropl", "paper"]
    assert all(set(m.presets) <= set(PRESETS) for m in METHODS.values())
    with pytest.raises(ConfigError, match=r"train.preset: unknown value 'sgd'; expected one of \['paper', 'adamw', 'hicropl'\]"):
        TrialConfig.from_dict({"train": {"preset": "sgd"}})


def test_dry_run_settings_show_the_methods_declared_keys():
    from orchestrator.status import settings

    for name, facts in METHODS.items():
        # `mapping: released` for hicropl: `released_storage` is set (and shown) under it only.
        extra = {"mapping": "released"} if name == "hicropl" else {}
        cfg = TrialConfig.from_dict({"method": {"name": name, "depth": 2, "cross_layer": 1, **extra}})
        line = settings(cfg)
        shown = [part.split(" ")[0] for part in line.split(", ")] if line else []
        assert shown[:len(facts.settings)] == list(facts.settings), name
        assert ("preset" in shown) == facts.trains, name


# A valid other value for every method key, for a tiny backbone (3 layers, widths 64); the base config is
# depth 2, cross layer 1 (what every method can build on it).
OTHER = {"n_ctx": 3, "depth": 1, "layers": (0, 1), "ctx_init": "a picture of", "pi": False, "sf": False,
         "label_embedding": "frozen", "share_fusion": True, "fusion_heads": 4, "fusion_bottleneck": 32,
         "lambda_le": 0.25, "lambda_sa": 0.25, "cls_loss": False, "sf_zero_init": False, "le_detach": False,
         "cross_layer": 2, "lkp_heads": 4, "mapper_heads": 4, "lambda_distill": 3.0, "mapping": "released"}
# Never set alone: `released_storage` is refused unless `mapping: released`; `descriptions` names files.
NOT_ALONE = {"name", "released_storage", "descriptions"}


def _numbers(name, backbone, classes, images, labels, **changes):
    from hisf.model.methods import build_method

    torch.manual_seed(0)
    model = build_method(MethodConfig(**{"name": name, "depth": 2, "cross_layer": 1, **changes}), backbone, classes)
    model.train()
    losses = model.forward_losses(images, labels)
    state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    return state, {k: v.detach() for k, v in losses.items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_keys_a_method_does_not_declare_do_not_change_its_numbers(name, backbone, classes, images, labels):
    """What the tracker leaves out of a run's params (facts.reads) must not change the method's parameters,
    logits or losses; a key that did would be a difference the MLflow compare view hides."""
    import dataclasses

    keys = {f.name for f in dataclasses.fields(MethodConfig)} - NOT_ALONE - set(METHODS[name].reads)
    assert keys <= set(OTHER), keys - set(OTHER)
    base_state, base_losses = _numbers(name, backbone, classes, images, labels)
    for key in sorted(keys):
        state, losses = _numbers(name, backbone, classes, images, labels, **{key: OTHER[key]})
        assert state.keys() == base_state.keys(), key
        assert all(torch.equal(state[k], base_state[k]) for k in state), key
        assert losses.keys() == base_losses.keys(), key
        assert all(torch.equal(losses[k], base_losses[k]) for k in losses), key


# (A zero-initialised fusion value projection hides the head count at initialisation: start it non-zero.)
@pytest.mark.parametrize("name, key, base", [
    ("coop", "n_ctx", {}), ("maple", "depth", {}), ("hisf", "lambda_le", {}), ("hisf", "fusion_heads", {"sf_zero_init": False}),
    ("hicropl", "lkp_heads", {}), ("hicropl", "lambda_distill", {})])
def test_declared_keys_do_change_them(name, key, base, backbone, classes, images, labels):
    assert key in METHODS[name].reads
    base_state, base_losses = _numbers(name, backbone, classes, images, labels, **base)
    state, losses = _numbers(name, backbone, classes, images, labels, **{**base, key: OTHER[key]})
    differs = state.keys() != base_state.keys() or any(
        not torch.equal(state[k], base_state[k]) for k in state) or any(
        not torch.equal(losses[k], base_losses[k]) for k in losses if k in base_losses and losses[k].shape == base_losses[k].shape)
    assert differs, (name, key)
