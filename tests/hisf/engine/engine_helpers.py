"""Helpers shared by the engine tests: a tiny prompt model with the PromptModel interface, trial configs, ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F

TINY_MODEL = "hisf-tiny"
WORKTREE = Path(__file__).resolve().parents[3]
TIMING_KEYS = ("train_seconds", "eval_seconds")


class TinyPromptModel(torch.nn.Module):
    """A frozen linear "encoder" with prompt/projection/fusion/label parameters: the PromptModel interface at toy size.

    Loss terms mirror eq. 12's shape: cross-entropy over cosine logits, a label-embedding distance and a
    per-sample alignment term, so the engine's step, precision and sync logic can be tested alone.
    """

    loss_terms = ("loss", "loss_cls", "loss_le", "loss_sa")

    def __init__(self, in_dim: int = 12, width: int = 8, n_classes: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoder = torch.nn.Linear(in_dim, width)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.prompt = torch.nn.Parameter(torch.randn(2, width, generator=g) * 0.1)
        self.proj = torch.nn.Linear(width, width)
        self.fusion = torch.nn.Linear(width, width)
        self.labels = torch.nn.Parameter(torch.randn(n_classes, width, generator=g))
        with torch.no_grad():
            for p in (*self.encoder.parameters(), *self.proj.parameters(), *self.fusion.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def _features(self, images):
        x = self.encoder(images.flatten(1)) + self.proj(self.prompt).mean(0)
        t = self.labels + self.fusion(self.prompt.mean(0, keepdim=True))
        return F.normalize(x, dim=-1), F.normalize(t, dim=-1)

    def forward(self, images):
        z_v, z_t = self._features(images)
        return 10.0 * z_v @ z_t.t()

    def forward_losses(self, images, labels):
        z_v, z_t = self._features(images)
        logits = 10.0 * z_v @ z_t.t()
        loss_cls = F.cross_entropy(logits.float(), labels)
        loss_le = (self.prompt.mean(0) - self.labels.mean(0)).float().norm()
        loss_sa = (1 - (z_v * z_t[labels]).sum(-1)).float().mean()
        loss = loss_cls + 0.5 * loss_le + 0.5 * loss_sa
        return {"loss": loss, "loss_cls": loss_cls, "loss_le": loss_le, "loss_sa": loss_sa, "logits": logits}

    def param_groups(self):
        return {"prompts": [self.prompt], "projections": list(self.proj.parameters()),
                "fusion": list(self.fusion.parameters()), "label_embeddings": [self.labels]}

    def trainable_state_dict(self):
        return {k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, sd):
        own = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)


def subprocess_env() -> dict[str, str]:
    """This environment for a child trial process: no inherited rank variables, this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = f"{WORKTREE}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_trial_dict(root, out, **sections):
    """A whole base-to-novel trial at toy size: hisf-tiny backbone (random weights), 4 shots, 2 epochs, fp32."""
    d = {
        "protocol": "base2new",
        "seed": 1,
        "backbone": {"name": TINY_MODEL, "pretrained": None, "precision": "fp32"},
        "method": {"name": "hisf", "depth": 2},
        "data": {"root": str(root), "dataset": "demo", "shots": 4},
        "train": {"preset": "paper", "epochs": 2, "batch_size": 4, "precision": "fp32", "eval_batch_size": 16,
                  "log_every": 1, "lr": 0.05},
        "output_dir": str(out),
        "device": "cpu",
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            d[key] = {**d.get(key, {}), **value}
        else:
            d[key] = value
    return d


def tiny_trial(root, out, **sections):
    from hisf.config import TrialConfig

    return TrialConfig.from_dict(tiny_trial_dict(root, out, **sections))


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def build_demo(base, classes: int, train: int, val: int, test: int, size: int = 24, image_size: int = 16):
    """Demo images written as real PNG files in CoOp's layout under base/raw, built into shards at
    base/shards/demo; returns the shards root (the trial's data.root)."""
    from data_shards.cli import main as data_main

    raw, root = base / "raw", base / "shards"
    assert data_main(["demo", "--out", str(raw), "--classes", str(classes), "--train", str(train), "--val", str(val),
                      "--test", str(test), "--size", str(size)]) == 0
    assert data_main(["build", "--dataset", "demo", "--root", str(raw), "--out", str(root / "demo"),
                      "--image-size", str(image_size), "--quiet"]) == 0
    return root
