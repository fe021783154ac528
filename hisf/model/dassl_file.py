"""Reading a Dassl checkpoint file (`model.pth.tar-N`, what MaPLe's and HiCroPL's released trainers save) safely."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

PREFIX = "prompt_learner."
# Buffers the released trainers rebuild from the class names at load time; never prompt parameters.
IGNORED = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
_STRIP_HINT = (
    "Dassl also pickles the optimizer and the LR scheduler objects, which weights_only loading refuses; "
    "keep only the weights, in an environment you trust: python -c \"import torch; c = torch.load('IN', "
    "weights_only=False); torch.save({'state_dict': c['state_dict'], 'epoch': c['epoch']}, 'OUT')\"")


def read_dassl_state_dict(source: str | Path | Mapping, what: str,
                          error: type[Exception]) -> tuple[str, dict[str, torch.Tensor]]:
    """(where, state dict) of a Dassl checkpoint: a file (loaded with weights_only=True) or a dict, `{"state_dict":
    ...}` or bare; `module.` (DataParallel) stripped. Raises `error` naming the file (`what`: "MaPLe", "HiCroPL")
    when it is missing, unreadable, not a mapping of tensors, or has no `prompt_learner.*` key."""
    where = str(source) if not isinstance(source, Mapping) else f"{what} state dict"
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            raise error(f"{where}: {what} checkpoint file not found")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [repr(e)]
            reason = next((l for l in lines if "WeightsUnpickler error" in l), lines[0])
            raise error(f"{where}: cannot read as a torch checkpoint with weights_only=True: "
                        f"{reason}" + (f". {_STRIP_HINT}" if "Unsupported global" in reason else "")) from e
    sd = source.get("state_dict", source) if isinstance(source, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise error(f"{where}: expected a dict with a 'state_dict' mapping of tensors, got {type(sd).__name__}")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if not any(k.startswith(PREFIX) for k in sd):
        raise error(f"{where}: no 'prompt_learner.*' keys; found {sorted(sd)[:5]}")
    return where, sd
