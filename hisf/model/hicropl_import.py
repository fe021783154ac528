"""Importing the released HiCroPL code's Dassl checkpoint (`VLPromptLearner/model.pth.tar-N`) into `mapping: released`.

The released trainer saves its whole `CustomCLIP` state dict: the prompt learner (`prompt_learner.*`), which
we load, and frozen CLIP weights (`prompt_learner.ZS_image_encoder.*`, the image teacher; `image_encoder.*`,
`text_encoder.*`, `logit_scale`), which must equal our backbone's and are checked, never loaded. Every
released key loads into the parameter of the same name (`ctx` is `cross_prompts_text.0`). Where our model's
parameters share one storage (the D visual prompts, each side's proxy tokens; docs/method.md), the
checkpoint's values for them must be equal, as a checkpoint saved by the released code on CPU holds them;
one saved after the released code moved the model to a GPU holds per-layer visual prompts and imports into
a model built with per-layer storage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from hisf.model.dassl_file import IGNORED, PREFIX, read_dassl_state_dict

TEACHER = "prompt_learner.ZS_image_encoder."
# Frozen CLIP keys of the released CustomCLIP -> our backbone's (open_clip, OpenAI layout) key prefix.
FROZEN = {TEACHER: "visual.", "image_encoder.": "visual.", "text_encoder.": ""}


class HiCroPLImportError(ValueError):
    """A HiCroPL checkpoint is unreadable, or its keys, shapes or frozen weights do not fit the model; the message names them."""


def read_hicropl_state_dict(source: str | Path | Mapping) -> tuple[str, dict[str, torch.Tensor]]:
    """(where, the checkpoint's state dict) from a file or a dict (`{"state_dict": ...}` or bare); `module.` stripped."""
    return read_dassl_state_dict(source, "HiCroPL", HiCroPLImportError)


def _count(sd: Mapping[str, torch.Tensor], name: str) -> int:
    pattern = re.compile(rf"^prompt_learner\.{name}\.(\d+)$")
    return sum(1 for k in sd if pattern.match(k))


def hicropl_key_map(depth: int, cross_layer: int) -> dict[str, str]:
    """Released `prompt_learner.*` prompt and proxy key -> our `released` PromptModel parameter name (the same name;
    `ctx` is one parameter with `cross_prompts_text.0`)."""
    mapping = {"prompt_learner.ctx": "prompts.cross_prompts_text.0"}
    for i in range(depth):
        mapping[f"prompt_learner.cross_prompts_text.{i}"] = f"prompts.cross_prompts_text.{i}"
        mapping[f"prompt_learner.cross_prompts_visual.{i}"] = f"prompts.cross_prompts_visual.{i}"
    for i in range(cross_layer):
        mapping[f"prompt_learner.text_proxy_token.{i}"] = f"prompts.text_proxy_token.{i}"
    for i in range(depth - cross_layer):
        mapping[f"prompt_learner.visual_proxy_token.{i}"] = f"prompts.visual_proxy_token.{i}"
    return mapping


def _storage_owner(model) -> dict[str, str]:
    """Our trainable parameter name -> the first parameter name over the same storage (itself when unshared)."""
    first: dict[tuple, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
            out[name] = first.setdefault(key, name)
    return out


def _check_frozen(where: str, sd: Mapping[str, torch.Tensor], backbone_sd: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint's frozen CLIP weights must be our backbone's (compared at the coarser of the two dtypes)."""
    for key, value in sd.items():
        prefix = next((p for p in FROZEN if key.startswith(p)), None)
        if prefix is None and key != "logit_scale":
            continue
        ours_key = FROZEN[prefix] + key[len(prefix):] if prefix else key
        ours = backbone_sd.get(ours_key)
        if ours is None or tuple(ours.shape) != tuple(value.shape):
            got = "no such weight" if ours is None else f"shape {tuple(ours.shape)}"
            raise HiCroPLImportError(
                f"{where}: frozen CLIP key {key!r} {tuple(value.shape)} has no match in the backbone ({ours_key!r}: {got}); "
                "the checkpoint was trained on another backbone")
        tol = max(torch.finfo(value.dtype).eps, torch.finfo(ours.dtype).eps) if value.is_floating_point() else 0.0
        diff = (value.float() - ours.detach().float().cpu()).abs()
        if diff.gt(tol * (1.0 + ours.detach().float().cpu().abs())).any():
            raise HiCroPLImportError(
                f"{where}: frozen CLIP key {key!r} differs from the backbone's {ours_key!r} (max |diff| "
                f"{diff.max().item():.3g}); the checkpoint was trained on other CLIP weights")


def import_hicropl_prompts(model, source: str | Path | Mapping) -> None:
    """Load the released code's prompt learner into a `hicropl` PromptModel with `mapping: released`.

    The model must have the checkpoint's n_ctx, depth D and cross layer k, checked from its keys and shapes;
    head counts leave no trace in the shapes (the released code uses 8 for the LKPs and the mappers), so
    they are the caller's. Nothing is loaded unless every check passes.
    """
    cfg = model.cfg
    if cfg.name != "hicropl" or cfg.mapping != "released":
        raise HiCroPLImportError(
            f"method: released HiCroPL checkpoints import into method 'hicropl' with mapping 'released'; "
            f"got method {cfg.name!r}, mapping {getattr(cfg, 'mapping', None)!r}")
    where, sd = read_hicropl_state_dict(source)
    depth, k = _count(sd, "cross_prompts_text"), _count(sd, "text_proxy_token")
    prompts = model.prompts
    if depth != prompts.depth:
        raise HiCroPLImportError(
            f"method.depth: {where} has HiCroPL prompt depth {depth} ({depth} 'prompt_learner.cross_prompts_text.*' keys); "
            f"the model's depth is {prompts.depth}")
    if k != prompts.k:
        raise HiCroPLImportError(
            f"method.cross_layer: {where} has cross layer k={k} ({k} 'prompt_learner.text_proxy_token.*' keys); "
            f"the model's cross_layer is {prompts.k}")

    mapping = hicropl_key_map(depth, k)
    own = model.trainable_state_dict()
    nets = {key for key in own if key.startswith(("prompts.attn_pooling_", "prompts.text2visual_net.",
                                                   "prompts.visual2text_net."))}
    mapping.update({"prompt_learner." + key[len("prompts."):]: key for key in nets})
    theirs = {key for key in sd if key.startswith(PREFIX) and key not in IGNORED and not key.startswith(TEACHER)}
    missing, unexpected = sorted(set(mapping) - theirs), sorted(theirs - set(mapping))
    if missing or unexpected:
        raise HiCroPLImportError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")

    owner = _storage_owner(model)
    new: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}  # storage owner -> the released key that gave its values
    for key, ours in mapping.items():
        value = sd[key]
        if tuple(value.shape) != tuple(own[ours].shape):
            raise HiCroPLImportError(
                f"{where}: key {key!r} has shape {tuple(value.shape)}; expected {tuple(own[ours].shape)} "
                f"(n_ctx={model.n_ctx} and the backbone's widths)")
        # The released fp16 run stores these in fp16; our trainable parameters stay float32.
        value = value.float()
        first = owner[ours]
        if first in source_of and not torch.equal(new[first], value):
            raise HiCroPLImportError(
                f"{where}: {key!r} differs from {source_of[first]!r}; the model holds them in one storage, as "
                "the released code builds them (and keeps them on CPU), so their values must be equal (a checkpoint "
                "from the released code on a GPU, where `.to(device)` unties them, needs method.released_storage: per_layer)")
        source_of.setdefault(first, key)
        new.setdefault(first, value)
        new[ours] = value
    missing_own = sorted(set(own) - set(new))
    if missing_own:
        raise HiCroPLImportError(f"{where}: the model's parameters {missing_own} have no released key")
    _check_frozen(where, sd, model.clip.state_dict())
    model.load_trainable_state_dict(new)
