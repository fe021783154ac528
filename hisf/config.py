"""The frozen, typed configuration of one trial: the only input the engine takes.

A trial config is built from a dict (an experiment spec plus a trial's sampled values, or a YAML file
given to `hisf-bench train`), validated in full before any work starts, and logged whole to the tracker
through `to_dict`/`flatten`. Errors name the key path (`method.depth`) and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hisf.model.facts import METHODS
from hisf.presets import PRESETS

MAPPINGS = ("learned", "released")
# `mapping: released`: its D visual prompt parameters over one storage (as the released code builds them and
# keeps them on CPU) or one storage each (as they become when the released code moves the model to a GPU).
RELEASED_STORAGES = ("shared", "per_layer")
PROTOCOLS = ("base2new", "all", "cross_dataset", "domain_generalization")
PRECISIONS = ("fp16", "bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names its key path."""


@dataclass(frozen=True)
class BackboneConfig:
    # open_clip architecture name (`ViT-B-16`) or one of ours under hisf/model/model_configs (`hisf-tiny`).
    name: str = "ViT-B-16"
    # open_clip pretrained tag (`openai`), a local checkpoint file, or None for random weights.
    pretrained: str | None = "openai"
    # An explicit open_clip model config dict; overrides the named architecture (tiny test models).
    model_cfg: Mapping[str, Any] | None = None
    # Storage dtype of the frozen backbone; trainable parameters always stay float32.
    precision: str = "fp32"
    # Where weights named by a pretrained tag are cached (`--weights-cache`, shared storage on a cluster);
    # None means open_clip's own caches (the Hugging Face hub cache, ~/.cache/clip).
    cache_dir: str | None = None

    def validate(self, path: str = "backbone") -> None:
        _check_choice(self.precision, PRECISIONS, f"{path}.precision")
        if not self.name:
            raise ConfigError(f"{path}.name: expected an open_clip model name, got {self.name!r}")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "hisf"
    # Prompt tokens per layer; None means the method's own default (hisf/model/facts.py: coop 16, maple/hisf 2,
    # hicropl 16).
    n_ctx: int | None = None
    # Prompt layers J = {0..depth-1}; `layers` (an explicit list) overrides depth when given. None (unset)
    # becomes the method's default at construction (hisf/model/facts.py): 9 (maple, hisf), 12 (hicropl).
    depth: int | None = None
    layers: tuple[int, ...] | None = None
    ctx_init: str = "a photo of a"
    # Ablation switches (docs/method.md): PI, SF, label embeddings, loss weights, cls loss.
    pi: bool = True
    sf: bool = True
    label_embedding: str = "learnable"
    share_fusion: bool = False
    fusion_heads: int = 8
    fusion_bottleneck: int = 64
    lambda_le: float = 1.0
    lambda_sa: float = 1.0
    cls_loss: bool = True
    # HISF decisions (docs/method.md): W_v of the fusion attention starts at zero; ē_c under stop-gradient in L_le.
    sf_zero_init: bool = True
    le_detach: bool = True
    # HiCroPL (docs/method.md): cross layer k (text->vision on layers 0..k-1, vision->text on k..D-1), head counts
    # of the LKPs and the mappers, the distillation weight λ, the text teacher's class descriptions
    # (`templates`, a JSON file or a folder of `<name>_prompt.json`), and the paper's or the released mapping.
    cross_layer: int = 6
    lkp_heads: int = 8
    mapper_heads: int = 8
    lambda_distill: float = 12.0
    descriptions: str = "templates"
    mapping: str = "learned"
    # `released` only: how the D visual prompts (and the proxy tokens) are stored. The released code creates
    # them over one tensor, but its trainer's `.to(cuda)` copies each parameter on its own, so the published
    # GPU runs trained D separate prompts that start equal: `per_layer` (the default under `released`);
    # `shared` keeps one storage, as that code runs on a CPU. Unset (None) for `learned`.
    released_storage: str | None = None

    def validate(self, path: str = "method") -> None:
        _check_choice(self.name, tuple(METHODS), f"{path}.name")
        _check_choice(self.label_embedding, ("learnable", "frozen"), f"{path}.label_embedding")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ConfigError(f"{path}.n_ctx: expected a positive integer, got {self.n_ctx}")
        if self.depth < 1:
            raise ConfigError(f"{path}.depth: expected an integer >= 1, got {self.depth}")
        _check_choice(self.mapping, MAPPINGS, f"{path}.mapping")
        if self.released_storage is not None:
            _check_choice(self.released_storage, RELEASED_STORAGES, f"{path}.released_storage")
        if self.released_storage is not None and self.mapping != "released":
            raise ConfigError(f"{path}.released_storage: {self.released_storage!r} applies to mapping 'released' only; "
                              f"got mapping {self.mapping!r}")
        if self.name == "hicropl":
            if self.layers is not None:
                raise ConfigError(f"{path}.layers: hicropl prompts layers 0..depth-1; set method.depth, not layers")
            depth = self.depth
            if not 1 <= self.cross_layer <= depth - 1:
                raise ConfigError(f"{path}.cross_layer: k={self.cross_layer} outside 1..{depth - 1} "
                                  f"(1 <= k <= depth-1 with depth {depth})")
            if self.lkp_heads < 1 or self.mapper_heads < 1:
                raise ConfigError(f"{path}.lkp_heads/mapper_heads: expected positive integers, got "
                                  f"{self.lkp_heads}/{self.mapper_heads}")
            if self.lambda_distill < 0:
                raise ConfigError(f"{path}.lambda_distill: expected a weight >= 0, got {self.lambda_distill}")
            if not self.descriptions:
                raise ConfigError(f"{path}.descriptions: expected `templates`, a JSON file or a folder, got ''")
        if self.layers is not None:
            if len(self.layers) == 0 or any(l < 0 for l in self.layers):
                raise ConfigError(f"{path}.layers: expected a non-empty list of layer indices >= 0, got {list(self.layers)}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"{path}.layers: duplicated layer index in {list(self.layers)}")
        for name in ("lambda_le", "lambda_sa"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: expected a weight >= 0, got {getattr(self, name)}")
        if self.fusion_heads < 1 or self.fusion_bottleneck < 1:
            raise ConfigError(f"{path}.fusion_heads/fusion_bottleneck: expected positive integers")

    @property
    def prompt_layers(self) -> tuple[int, ...]:
        """The sorted prompt layers J (docs/method.md: `depth` or an explicit list)."""
        if self.layers is not None:
            return tuple(sorted(self.layers))
        return tuple(range(self.depth))

    def __post_init__(self) -> None:
        # An unset depth becomes the method's default at construction, so params, tags and checkpoint
        # identities always record the depth that ran (9 for maple/hisf, 12 for hicropl).
        if self.depth is None and self.name in METHODS:
            object.__setattr__(self, "depth", METHODS[self.name].depth)
        if self.released_storage is None and self.mapping == "released":
            object.__setattr__(self, "released_storage", "per_layer")


@dataclass(frozen=True)
class DataConfig:
    # Folder holding built shards, one sub-folder per dataset key (`hisf-bench data build --out`).
    root: str = "data"
    dataset: str = "caltech101"
    shots: int = 16
    # Evaluation datasets for cross_dataset / domain_generalization.
    targets: tuple[str, ...] = ()
    num_workers: int = 0

    def validate(self, path: str = "data") -> None:
        if self.shots < 1:
            raise ConfigError(f"{path}.shots: expected K >= 1, got {self.shots}")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: expected >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "paper"
    epochs: int = 5
    # Per-rank batch size (the paper's 4).
    batch_size: int = 4
    # None means the preset's value (hisf/presets.py, docs/method.md): paper lr 0.0035 SGD; adamw lr 1e-3;
    # hicropl Adam lr 0.0025, eps 1e-3, coupled weight decay 5e-4 (batch 32 recommended).
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    # adamw preset: prompt matrices get lr * prompt_lr_mult.
    prompt_lr_mult: float = 10.0
    precision: str = "fp16"
    eval_batch_size: int = 100
    log_every: int = 20
    # Stop the trial after this many non-finite losses in a row (NaN guard).
    max_nonfinite_steps: int = 5
    # Evaluate validation accuracy every epoch (search stage objective); never reads the test split.
    validate_every_epoch: bool = True
    # torch.compile the model's loss computation (forward_losses) on the trial's device; "reduce-overhead"
    # adds CUDA graphs. Same numbers as eager within fp tolerance; the first steps pay the compile time.
    compile: bool = False
    compile_mode: str = "default"
    # Bit-reproducible kernels (hisf.engine.step.deterministic_mode): deterministic algorithms, cuDNN
    # deterministic, TF32 off, CUBLAS_WORKSPACE_CONFIG. Slower on a GPU; for equality checks (resume, compiled
    # vs eager) and debugging. The CPU path is deterministic either way.
    deterministic: bool = False

    def validate(self, path: str = "train") -> None:
        _check_choice(self.preset, tuple(PRESETS), f"{path}.preset")
        _check_choice(self.precision, PRECISIONS, f"{path}.precision")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"{path}.compile: expected true or false, got {self.compile!r}")
        _check_choice(self.compile_mode, COMPILE_MODES, f"{path}.compile_mode")
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"{path}.deterministic: expected true or false, got {self.deterministic!r}")
        if self.epochs < 0:
            raise ConfigError(f"{path}.epochs: expected >= 0, got {self.epochs}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: expected >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"{path}.lr: expected > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{path}.momentum: expected 0 <= momentum < 1, got {self.momentum}")
        for name in ("weight_decay", "warmup_epochs", "warmup_lr", "prompt_lr_mult", "log_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{path}.{name}: expected >= 0, got {value}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"{path}.max_nonfinite_steps: expected >= 1, got {self.max_nonfinite_steps}")


@dataclass(frozen=True)
class TrialConfig:
    protocol: str = "base2new"
    seed: int = 1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where checkpoints, exported prompts and metrics.json go; a rerun with the same dir resumes.
    output_dir: str = "runs/trial"
    # `auto` (cuda when available), `cpu`, `cuda`, `cuda:N`.
    device: str = "auto"
    # False for search-stage trials: the trial never opens a test split (docs/protocols.md: the test split never
    # feeds a search); final metrics are then the validation ones only.
    evaluate_test: bool = True

    def validate(self) -> "TrialConfig":
        _check_choice(self.protocol, PROTOCOLS, "protocol")
        check_seed(self.seed, "seed")
        self.backbone.validate()
        self.method.validate()
        self.data.validate()
        self.train.validate()
        accepted = METHODS[self.method.name].presets
        if self.train.preset not in accepted:
            raise ConfigError(f"train.preset: method {self.method.name!r} does not train with preset "
                              f"{self.train.preset!r}; expected one of {list(accepted)}")
        if self.protocol in ("cross_dataset", "domain_generalization") and not self.data.targets:
            raise ConfigError(f"data.targets: protocol {self.protocol!r} needs at least one target dataset")
        if self.backbone.precision == "fp16" and self.train.precision != "fp16":
            # Only fp16 training has a GradScaler: gradients that flow through half-precision activations of an
            # fp16-stored backbone underflow to zero without one.
            store = "bf16 or fp32" if self.train.precision == "bf16" else "fp32"
            raise ConfigError(f"backbone.precision: 'fp16' storage with train.precision {self.train.precision!r} "
                              f"trains without loss scaling, so small gradients through the half-precision backbone "
                              f"underflow to zero; set train.precision: fp16 (autocast + GradScaler) or store the "
                              f"backbone to match, backbone.precision: {store}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flatten(self) -> dict[str, Any]:
        """`{"method.depth": 9, ...}`: one entry per leaf, for tracker params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix not in ("backbone.model_cfg",):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialConfig":
        return from_dict(cls, data).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrialConfig":
        import yaml

        from hisf.yaml_io import load_yaml, yaml_error

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: trial config file not found")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {yaml_error(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def replace_path(cfg: Any, key_path: str, value: Any, _full: str | None = None) -> Any:
    """Return a copy of a config dataclass with one dotted key (`method.lambda_le`) set, type-checked."""
    full = _full or key_path
    head, _, rest = key_path.partition(".")
    names = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(f"{full}: unknown key {head!r}; expected one of {sorted(names)}")
    if rest:
        sub = getattr(cfg, head)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"{full}: {head!r} is not a section")
        return dataclasses.replace(cfg, **{head: replace_path(sub, rest, value, full)})
    hints = typing.get_type_hints(type(cfg))
    return dataclasses.replace(cfg, **{head: _coerce(value, hints[head], full)})


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, strictly: unknown keys and wrong types are errors."""
    where = path or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{key}: unknown key; expected one of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (a field's annotation: int, float, str, bool, Mapping, tuple[...], Optional, a config
    dataclass), strictly; raises ConfigError naming `key`, what was expected and what was given. The experiment
    spec checks its own keys with it too, so both speak alike."""
    return _coerce(value, tp, key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return check_number(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def check_number(value: Any, key: str) -> float:
    """A finite int or float as float: YAML's `.nan`/`.inf` would fail every retry of a trial (or poison a search)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def check_seed(value: int, key: str) -> int:
    """numpy's and Optuna's seeds are 32-bit unsigned: anything else fails in every retry."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key}: expected an integer in 0..{MAX_SEED}, got {value}")
    return value


def _check_choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}; expected one of {list(choices)}")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
