"""Each method's facts are declared once (hisf/model/facts.py): builders, config defaults and run lines read them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hisf.config import ConfigError, MethodConfig, TrialConfig
from hisf.model.facts import METHODS, PARAM_GROUPS
from hisf.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]


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
