"""Importing MaPLe's released prompt parameters (Dassl `model.pth.tar-N`) into our `maple` method."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from hisf.model.dassl_file import IGNORED, PREFIX, read_dassl_state_dict

_TEXT = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")


class MapleImportError(ValueError):
    """A MaPLe checkpoint is unreadable, or its keys or shapes do not fit the model; the message names them."""


def read_maple_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `prompt_learner.*` tensors of a MaPLe checkpoint (file or dict, `{"state_dict": ...}` or bare)."""
    where, sd = read_dassl_state_dict(source, "MaPLe", MapleImportError)
    out = {k: v for k, v in sd.items() if k.startswith(PREFIX) and k not in IGNORED}
    if not out:
        raise MapleImportError(f"{where}: no 'prompt_learner.*' keys; found {sorted(sd)[:5]}")
    return out


def maple_depth(sd: Mapping[str, torch.Tensor]) -> int:
    """MaPLe's PROMPT_DEPTH: 1 + the number of compound (deeper) prompts."""
    return 1 + sum(1 for k in sd if _TEXT.match(k))


def maple_key_map(depth: int) -> dict[str, str]:
    """MaPLe key -> our `maple` PromptModel parameter name (layer i of J = {0..depth-1})."""
    mapping = {
        "prompt_learner.ctx": "prompts.shared.0",
        "prompt_learner.proj.weight": "prompts.vision_proj.0.weight",
        "prompt_learner.proj.bias": "prompts.vision_proj.0.bias",
    }
    for i in range(depth - 1):
        mapping[f"prompt_learner.compound_prompts_text.{i}"] = f"prompts.shared.{i + 1}"
        mapping[f"prompt_learner.compound_prompt_projections.{i}.weight"] = f"prompts.vision_proj.{i + 1}.weight"
        mapping[f"prompt_learner.compound_prompt_projections.{i}.bias"] = f"prompts.vision_proj.{i + 1}.bias"
    return mapping


def import_maple_prompts(model, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load MaPLe's prompt parameters into a `maple` PromptModel built with the same n_ctx and depth."""
    if model.cfg.name != "maple":
        raise MapleImportError(f"method.name: MaPLe prompts import into method 'maple', got {model.cfg.name!r}")
    sd = read_maple_state_dict(source)
    depth = maple_depth(sd)
    if model.layers != tuple(range(depth)):
        raise MapleImportError(
            f"method.depth: the checkpoint has MaPLe prompt depth {depth} (layers 0..{depth - 1}); "
            f"the model's prompt layers are {list(model.layers)}"
        )
    mapping = maple_key_map(depth)
    missing = sorted(set(mapping) - set(sd))
    unexpected = sorted(set(sd) - set(mapping))
    if missing or unexpected:
        raise MapleImportError(f"MaPLe checkpoint: missing keys {missing}, unexpected keys {unexpected}")
    own = model.trainable_state_dict()
    new = {}
    for theirs, ours in mapping.items():
        if tuple(sd[theirs].shape) != tuple(own[ours].shape):
            raise MapleImportError(
                f"MaPLe checkpoint: key {theirs!r} has shape {tuple(sd[theirs].shape)}; "
                f"expected {tuple(own[ours].shape)} (n_ctx={model.n_ctx}, backbone widths)"
            )
        # MaPLe keeps `proj` in fp16 under its fp16 trainer; our trainable parameters stay float32.
        new[ours] = sd[theirs].float()
    model.load_trainable_state_dict(new)
