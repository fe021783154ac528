"""Reading a Dassl checkpoint file (`model.pth.tar-N`, what MaPLe's and HiCroPL's released trainers save) safely."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from hisf.safe_load import safe_load

PREFIX = "prompt_learner."
# Buffers the released trainers rebuild from the class names at load time; never prompt parameters.
IGNORED = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
# Dassl saves its optimizer and LR-scheduler objects beside the weights; we never unpickle objects.
_STRIP_HINT = ("Dassl also pickles its optimizer and LR-scheduler objects into the file: keep only the weights, "
               "saving {'state_dict': ..., 'epoch': ...} in the code that trained them")


def read_dassl_state_dict(source: str | Path | Mapping, what: str,
                          error: type[Exception]) -> tuple[str, dict[str, torch.Tensor]]:
    """(where, state dict) of a Dassl checkpoint: a file (safe_load: tensors and plain containers only) or a dict,
    `{"state_dict": ...}` or bare; `module.` (DataParallel) stripped. Raises `error` naming the file (`what`:
    "MaPLe", "HiCroPL") when it is missing, unreadable, not a mapping of tensors, or has no `prompt_learner.*` key."""
    where = str(source) if not isinstance(source, Mapping) else f"{what} state dict"
    if not isinstance(source, Mapping):
        source = safe_load(source, f"{what} checkpoint", error, pickled_hint=_STRIP_HINT)
    sd = source.get("state_dict", source) if isinstance(source, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise error(f"{where}: expected a dict with a 'state_dict' mapping of tensors, got {type(sd).__name__}")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if not any(k.startswith(PREFIX) for k in sd):
        raise error(f"{where}: no 'prompt_learner.*' keys; found {sorted(sd)[:5]}")
    return where, sd
