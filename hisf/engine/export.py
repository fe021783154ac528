"""The exported prompts (`output_dir/prompts.pt`): a finished trial's trained prompt-side weights, with what
rebuilds the model, small enough to keep (a few MB) when the training checkpoint goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from hisf.config import ConfigError, TrialConfig
from hisf.engine.atomic import atomic_save
from hisf.safe_load import safe_load

PROMPTS_FILE = "prompts.pt"
FORMAT_VERSION = 1


def export_prompts(path: str | Path, trainable: Mapping[str, torch.Tensor], cfg: TrialConfig,
                   classnames: tuple[str, ...], template: str | None = None) -> Path:
    """Write the trained prompt-side weights alone with the method, backbone, dataset, its training class names and
    its prompt template (what `hisf-bench predict` rebuilds the model over)."""
    payload = {
        "version": FORMAT_VERSION,
        "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
        "method": cfg.to_dict()["method"],
        "backbone": cfg.to_dict()["backbone"],
        "dataset": cfg.data.dataset,
        "classnames": list(classnames),
    }
    if template is not None:
        payload["template"] = template
    atomic_save(payload, path)
    return Path(path)


def _without_cache(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "cache_dir"}


def load_prompts(path: str | Path, model: Any, cfg: TrialConfig | None = None) -> dict[str, Any]:
    """Load exported prompts into a PromptModel built with the same method/backbone; returns the payload."""
    payload = read_prompts(path, cfg)
    model.load_trainable_state_dict(payload["trainable"])
    return payload


def read_prompts(path: str | Path, cfg: TrialConfig | None = None) -> dict[str, Any]:
    """The payload of an exported prompts file, read safely (tensors and plain data only, `weights_only`), checked
    against `cfg`'s method and backbone when given (ConfigError naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported prompts file not found")
    payload = safe_load(path, "prompts file", ConfigError)
    if not isinstance(payload, dict) or "trainable" not in payload:
        raise ConfigError(f"{path}: not a prompts file we load: expected a dict with 'trainable' weights "
                          f"(hisf-bench's prompts.pt), got {type(payload).__name__}")
    if cfg is not None:
        for section in ("method", "backbone"):
            # Where the backbone's weights are cached is not which weights they are.
            if _without_cache(payload[section]) != _without_cache(cfg.to_dict()[section]):
                raise ConfigError(f"{path}: prompts were trained with a different {section} config "
                                  f"({payload[section]}) than {cfg.to_dict()[section]}")
    return payload
