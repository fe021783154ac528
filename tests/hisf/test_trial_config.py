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
