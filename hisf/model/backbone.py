"""The frozen open_clip backbone: loading weights, freezing, storage precision (model configs: backbone_shape.py)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from hisf.config import BackboneConfig, ConfigError, PRECISIONS
# Resolving the model config needs no torch: it lives with the shape checks spec validation runs.
from hisf.model.backbone_shape import (MODEL_CONFIG_DIR, BackboneError, available_model_configs,  # noqa: F401
                                       resolve_model_cfg)
from hisf.safe_load import safe_load

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys OpenAI's own checkpoints carry besides the weights (clip.load's JIT archive, its state_dict()).
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
# The seed of a backbone built without pretrained weights (tests, the demo).
RANDOM_WEIGHTS_SEED = 0


@dataclass
class Backbone:
    """A frozen open_clip CLIP model plus what prompt methods need to know about it."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    text_width: int
    vision_width: int
    embed_dim: int
    context_length: int
    text_layers: int
    vision_layers: int
    dtype: torch.dtype
    quick_gelu: bool

    @property
    def logit_scale(self) -> torch.Tensor:
        # CLIP's temperature τ stays frozen (docs/method.md, eq. 11); computed in float32.
        return self.model.logit_scale.detach().float().exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def bpe(self, text: str) -> list[int]:
        """Token ids of `text` without [SOS]/[EOS] (the tokenizer's own cleaning applied)."""
        return list(self.tokenizer.encode(text))

    @torch.no_grad()
    def token_embeddings(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Float32 copies of CLIP's token embeddings for `ids` (initial values of learnable prompts)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.token_embedding(ids).float().clone()


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the open_clip model, load its weights (tag, local file or none), freeze it, cast its storage."""
    import open_clip
    from open_clip.model import CLIP, convert_weights_to_lp, get_cast_dtype

    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"backbone.precision: unknown value {cfg.precision!r}; expected one of {list(PRECISIONS)}")
    model_cfg = resolve_model_cfg(cfg)
    pretrained = cfg.pretrained
    state_dict = None
    if pretrained:
        if Path(pretrained).exists():
            state_dict, openai_format = _read_weights(Path(pretrained))
            # OpenAI's weights were trained with QuickGELU; open_clip's plain configs default to GELU.
            if openai_format:
                model_cfg["quick_gelu"] = True
        else:
            tag_cfg, _, _ = _tag_sources(cfg)
            if tag_cfg.get("quick_gelu", False):
                model_cfg["quick_gelu"] = True
            state_dict, _ = _read_weights(Path(fetch_weights(cfg)))

    dtype = _DTYPES[cfg.precision]
    # cast_dtype picks open_clip's float32-internal LayerNorm for half storage, as its own fp16 models do.
    # Random weights (`pretrained: null`) come from a fixed seed, not the caller's RNG: the frozen backbone is
    # the same for every trial of a sweep whatever its seed, as pretrained weights are, so the members of a
    # fused group (one backbone, several seeds) see what each would see alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = CLIP(**model_cfg, cast_dtype=get_cast_dtype(cfg.precision))
    if state_dict is not None:
        _load_weights(model, state_dict, pretrained)
    model.requires_grad_(False)
    model.eval()
    if dtype != torch.float32:
        # open_clip's (and OpenAI's) half storage: matmul weights in half, LayerNorms and embeddings float32.
        convert_weights_to_lp(model, dtype)

    vision_cfg = model_cfg["vision_cfg"]
    image_size = vision_cfg.get("image_size", 224)
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    context_length = model.context_length
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    if model.vocab_size != tokenizer.vocab_size:
        raise BackboneError(
            f"backbone.name: {cfg.name!r} has vocab_size {model.vocab_size}; expected CLIP's BPE vocabulary "
            f"of {tokenizer.vocab_size} tokens"
        )
    mean = tuple(model_cfg.get("preprocess_cfg", {}).get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(model_cfg.get("preprocess_cfg", {}).get("std", open_clip.OPENAI_DATASET_STD))
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_size=int(image_size),
        mean=mean,
        std=std,
        text_width=model.transformer.width,
        vision_width=model.visual.transformer.width,
        embed_dim=model_cfg["embed_dim"],
        context_length=context_length,
        text_layers=len(model.transformer.resblocks),
        vision_layers=len(model.visual.transformer.resblocks),
        dtype=dtype,
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
    )


def _tag_sources(cfg: BackboneConfig) -> tuple[dict, list[tuple[str, str]], str]:
    """(open_clip's pretrained cfg, the Hugging Face (repo, file) candidates in open_clip's order, the URL)."""
    import open_clip
    import os

    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives, has_hf_hub

    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained) if cfg.model_cfg is None else {}
    if not tag_cfg:
        raise BackboneError(
            f"backbone.pretrained: {cfg.pretrained!r} is neither a file nor a pretrained tag of {cfg.name!r}; "
            f"expected a local checkpoint path or one of {open_clip.list_pretrained_tags_by_model(cfg.name)}")
    hf = []
    if tag_cfg.get("hf_hub") and has_hf_hub():
        # As open_clip.pretrained.download_pretrained: 'org/model/' names the default file; safetensors first.
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        hf = [(repo, f) for f in [*_get_safe_alternatives(filename), filename]]
    return tag_cfg, hf, tag_cfg.get("url", "")


def cached_weights(cfg: BackboneConfig) -> str | None:
    """The cached file of a pretrained tag, looked up without any network access; None when not cached.

    Looks where open_clip's own download would put it: the Hugging Face hub cache (`cache_dir`, or the hub's
    default), then the URL download cache (`cache_dir`, or ~/.cache/clip)."""
    import os

    tag_cfg, hf, url = _tag_sources(cfg)
    if tag_cfg.get("file"):
        return tag_cfg["file"]
    if hf:
        from huggingface_hub import try_to_load_from_cache

        for repo, filename in hf:
            found = try_to_load_from_cache(repo, filename, cache_dir=cfg.cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if url:
        path = Path(cfg.cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def fetch_weights(cfg: BackboneConfig, probe_timeout: float = 5.0) -> str:
    """The local file holding a pretrained tag's weights: the cached copy, else downloaded once into the cache.

    Without network (a quick connection probe first, so this fails in seconds instead of after the hub
    client's retries) the error says how to pass a local checkpoint instead."""
    import os

    found = cached_weights(cfg)
    if found:
        return found
    import open_clip

    tag_cfg, hf, url = _tag_sources(cfg)
    where = cfg.cache_dir or "open_clip's default cache (~/.cache/huggingface/hub, ~/.cache/clip)"
    source = f"https://huggingface.co/{hf[0][0]}" if hf else url
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and bool(hf)
    reason = "HF_HUB_OFFLINE is set" if offline else _unreachable(hf, url, probe_timeout)
    if not reason:
        try:
            return open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=cfg.cache_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do instead
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise BackboneError(
        f"backbone.pretrained: weights {cfg.pretrained!r} of {cfg.name!r} are not cached in {where} and cannot be "
        f"fetched from {source} ({reason}). Download the checkpoint on a machine with network access and either "
        f"pass it as a local checkpoint (`backbone.pretrained: /path/to/file.pt` in the spec's base or a row, "
        f"the file readable on every node) or put it in the cache given with `--weights-cache DIR`")


def _unreachable(hf: list, url: str, timeout: float) -> str:
    """Why the weights' host cannot be reached ('' when it can, or when a proxy decides)."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hf else url)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"no connection to {host.hostname}: {e}"
    return ""


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Weights from a file: OpenAI's TorchScript archive, or a (wrapped) OpenAI/open_clip state dict."""
    if not path.is_file():
        raise BackboneError(f"backbone.pretrained: {str(path)!r} is not a file; expected a checkpoint file")
    openai_format = False
    if path.suffix == ".safetensors":
        # The Hugging Face hub copies of open_clip's tags (open_clip_model.safetensors).
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    elif zipfile.is_zipfile(path) and _is_torchscript(path):
        # clip.load's ViT-B-16.pt is a TorchScript archive; weights_only pickling cannot read it.
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        openai_format = True
    else:
        sd = safe_load(path, "checkpoint", BackboneError, key="backbone.pretrained")
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise BackboneError(f"backbone.pretrained: {str(path)!r} holds no state dict (got {type(sd).__name__})")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k in sd for k in _OPENAI_META_KEYS):
        openai_format = True
    for k in _OPENAI_META_KEYS:
        sd.pop(k, None)
    return dict(sd), openai_format


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed

    state_dict = convert_state_dict(model, state_dict)
    resize_pos_embed(state_dict, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise BackboneError(
            f"backbone.pretrained: {source!r} does not match the model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise BackboneError(
                f"backbone.pretrained: {source!r} key {k!r} has shape {tuple(v.shape)}; expected {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)


def check_weights_file(path: str | Path) -> None:
    """Raise BackboneError unless `path` is a weights file `load_backbone` reads (the pre-flight calls it on the
    driver before Ray starts: a file that is not a checkpoint would fail every retry of every trial)."""
    _read_weights(Path(path))
