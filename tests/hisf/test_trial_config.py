"""The trial config: strict parsing with key-path errors, flattening for the tracker, dotted replacement."""

import pytest

from hisf.config import ConfigError, MethodConfig, TrialConfig, replace_path


def test_from_dict_fills_defaults_and_coerces_types():
    cfg = TrialConfig.from_dict(
        {"seed": 2, "method": {"name": "maple", "layers": [3, 4, 5], "lambda_le": 1}, "data": {"targets": ["dtd"]}}
    )
    assert cfg.seed == 2
    assert cfg.method.layers == (3, 4, 5)
    assert cfg.method.prompt_layers == (3, 4, 5)
    assert isinstance(cfg.method.lambda_le, float) and cfg.method.lambda_le == 1.0
    assert cfg.data.targets == ("dtd",)
    assert cfg.train.preset == "paper" and cfg.train.precision == "fp16"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"method": {"depht": 3}}, "method.depht"),
        ({"method": {"depth": "9"}}, "method.depth"),
        ({"method": {"name": "clip++"}}, "method.name"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"method": {"layers": [1, 1]}}, "method.layers"),
        ({"method": {"lambda_sa": -0.1}}, "method.lambda_sa"),
        ({"protocol": "cross_dataset"}, "data.targets"),
        ({"seed": True}, "seed"),
        ({"train": {"compile": "yes"}}, "train.compile"),
        ({"train": {"compile_mode": "fast"}}, "train.compile_mode"),
        ({"train": {"batch_size": 0}}, "train.batch_size: expected >= 1, got 0"),
        ({"train": {"eval_batch_size": 0}}, "train.eval_batch_size: expected >= 1, got 0"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_values_name_their_key_path(data, key):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(data)
    assert str(err.value).startswith(key), str(err.value)


def test_flatten_and_round_trip():
    cfg = TrialConfig.from_dict({"method": {"depth": 4}, "backbone": {"model_cfg": {"embed_dim": 8}}})
    flat = cfg.flatten()
    assert flat["method.depth"] == 4
    assert flat["backbone.model_cfg"] == {"embed_dim": 8}
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg


def test_replace_path_is_typed():
    cfg = replace_path(TrialConfig(), "method.lambda_le", 2)
    assert cfg.method.lambda_le == 2.0 and TrialConfig().method.lambda_le == 1.0
    with pytest.raises(ConfigError, match="method.nope"):
        replace_path(cfg, "method.nope", 1)
    with pytest.raises(ConfigError, match="method.depth"):
        replace_path(cfg, "method.depth", "deep")


def test_depth_gives_layers_from_zero():
    assert MethodConfig(depth=3).prompt_layers == (0, 1, 2)


def test_from_yaml_names_the_file(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("method:\n  n_ctx: zero\n")
    with pytest.raises(ConfigError, match=r"trial.yaml: method.n_ctx"):
        TrialConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        TrialConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("data, message", [
    ({"train": {"lr": float("nan")}}, "train.lr: expected a finite number, got nan"),
    ({"train": {"warmup_lr": float("inf")}}, "train.warmup_lr: expected a finite number, got inf"),
    ({"method": {"lambda_sa": float("-inf")}}, "method.lambda_sa: expected a finite number, got -inf"),
    ({"seed": -1}, "seed: expected an integer in 0..4294967295, got -1"),
    ({"seed": 2**32}, "seed: expected an integer in 0..4294967295, got 4294967296"),
    ({"train": {"momentum": -0.1}}, "train.momentum: expected 0 <= momentum < 1, got -0.1"),
    ({"train": {"momentum": 1.0}}, "train.momentum: expected 0 <= momentum < 1, got 1.0"),
    ({"train": {"weight_decay": -0.5}}, "train.weight_decay: expected >= 0, got -0.5"),
    ({"train": {"warmup_epochs": -1}}, "train.warmup_epochs: expected >= 0, got -1"),
    ({"train": {"warmup_lr": -1e-5}}, "train.warmup_lr: expected >= 0, got -1e-05"),
    ({"train": {"prompt_lr_mult": -2.0}}, "train.prompt_lr_mult: expected >= 0, got -2.0"),
    ({"train": {"log_every": -1}}, "train.log_every: expected >= 0, got -1"),
])
def test_numbers_that_fail_every_retry_are_refused(data, message):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(data)
    assert str(err.value).startswith(message), str(err.value)
    # the same value set by a dotted key (`--set`, a searched value, a grid value)
    key = message.split(":")[0]
    with pytest.raises(ConfigError) as err:
        replace_path(TrialConfig(), key, next(_leaves(data))).validate()
    assert str(err.value).startswith(message), str(err.value)


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def test_from_yaml_refuses_duplicated_keys_and_bad_yaml_naming_the_file(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("seed: 1\nmethod:\n  name: hisf\n  depth: 3\n  depth: 5\n")
    with pytest.raises(ConfigError, match=r"trial.yaml: not valid YAML: duplicate key 'depth' at line 5 "
                                          r"\(first at line 4\)"):
        TrialConfig.from_yaml(path)
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' at line 2 \(first at line 1\)"):
        TrialConfig.from_yaml(path)
    path.write_text("method: {name: hisf\n")
    with pytest.raises(ConfigError, match=r"trial.yaml: not valid YAML: "):
        TrialConfig.from_yaml(path)
    path.write_text("method: {name: hisf, depth: 3}\ntrain: {lr: .nan}\n")
    with pytest.raises(ConfigError, match=r"trial.yaml: train.lr: expected a finite number, got nan"):
        TrialConfig.from_yaml(path)


def test_train_set_values_are_read_strictly_too(tmp_path, capsys):
    from hisf.train import main

    path = tmp_path / "trial.yaml"
    path.write_text("method: {name: coop}\n")
    assert main([str(path), "--set", "method={name: hisf, name: coop}"]) == 2
    assert "--set 'method={name: hisf, name: coop}': the value is not valid YAML: duplicate key 'name' at line 1, " \
           "column 14 (first at column 2)" in capsys.readouterr().err
    assert main([str(path), "--set", "train.lr=.nan"]) == 2
    assert "train.lr: expected a finite number, got nan" in capsys.readouterr().err
