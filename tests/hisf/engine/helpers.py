"""Helpers shared by the engine tests: a tiny prompt model with the PromptModel interface, trial configs, demo shards,
and a trial SIGKILLed in a child process then rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from tests.support import ROOT as WORKTREE
from tests.support import build_demo_shards, child_env, free_port, torchrun  # noqa: F401  (the engine tests' one import)

TINY_MODEL = "hisf-tiny"
TIMING_KEYS = ("train_seconds", "eval_seconds")


class TinyPromptModel(torch.nn.Module):
    """A frozen linear "encoder" with prompt/projection/fusion/label parameters: the PromptModel interface at toy size,
    member axis included (`members` stacked trials; member k is what `TinyPromptModel(seed=seed + k)` holds alone).

    Loss terms mirror eq. 12's shape: cross-entropy over cosine logits, a label-embedding distance and a
    per-sample alignment term, so the engine's step, precision and sync logic can be tested alone.
    """

    loss_terms = ("loss", "loss_cls", "loss_le", "loss_sa")

    def __init__(self, in_dim: int = 12, width: int = 8, n_classes: int = 3, seed: int = 0, members: int = 1):
        super().__init__()
        self.members = members
        self.encoder = torch.nn.Linear(in_dim, width)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        drawn = [self._draw(in_dim, width, n_classes, seed + k) for k in range(members)]
        with torch.no_grad():
            self.encoder.weight.copy_(drawn[0]["encoder.weight"])
            self.encoder.bias.copy_(drawn[0]["encoder.bias"])
        for name in ("prompt", "proj_weight", "proj_bias", "fusion_weight", "fusion_bias", "labels"):
            self.register_parameter(name, torch.nn.Parameter(torch.stack([d[name] for d in drawn])))

    @staticmethod
    def _draw(in_dim, width, n_classes, seed):
        g = torch.Generator().manual_seed(seed)
        out = {"prompt": torch.randn(2, width, generator=g) * 0.1, "labels": torch.randn(n_classes, width, generator=g)}
        for name, shape in (("encoder.weight", (width, in_dim)), ("encoder.bias", (width,)),
                            ("proj_weight", (width, width)), ("proj_bias", (width,)),
                            ("fusion_weight", (width, width)), ("fusion_bias", (width,))):
            out[name] = torch.randn(shape, generator=g) * 0.3
        return out

    def _features(self, images, shared=False):
        k = self.members
        x = self.encoder(images.flatten(1))  # [N, W]
        x = x.unsqueeze(0).expand(k, -1, -1) if shared else x.view(k, -1, x.shape[-1])
        proj = torch.baddbmm(self.proj_bias[:, None], self.prompt, self.proj_weight.transpose(1, 2)).mean(1)  # [K, W]
        fused = torch.baddbmm(self.fusion_bias[:, None], self.prompt.mean(1, keepdim=True),
                              self.fusion_weight.transpose(1, 2))  # [K, 1, W]
        z_v = F.normalize(x + proj[:, None], dim=-1)
        z_t = F.normalize(self.labels + fused, dim=-1)
        return z_v, z_t

    def forward(self, images, shared=False):
        z_v, z_t = self._features(images, shared)
        return 10.0 * z_v @ z_t.transpose(1, 2)

    def forward_losses(self, images, labels):
        z_v, z_t = self._features(images)
        labels = labels.view(self.members, -1)
        logits = 10.0 * z_v @ z_t.transpose(1, 2)
        k, b, c = logits.shape
        loss_cls = F.cross_entropy(logits.float().reshape(k * b, c), labels.reshape(-1), reduction="none").view(k, b).mean(1)
        loss_le = (self.prompt.mean(1) - self.labels.mean(1)).float().norm(dim=-1)
        own = torch.gather(z_t, 1, labels.unsqueeze(-1).expand(-1, -1, z_t.shape[-1]))
        loss_sa = (1 - (z_v * own).sum(-1)).float().mean(1)
        loss = loss_cls + 0.5 * loss_le + 0.5 * loss_sa
        return {"loss": loss, "loss_cls": loss_cls, "loss_le": loss_le, "loss_sa": loss_sa, "logits": logits}

    def member_parameters(self):
        return [(k, p) for k, p in self.named_parameters() if not k.startswith("encoder.")]

    def param_groups(self):
        return {"prompts": [self.prompt], "projections": [self.proj_weight, self.proj_bias],
                "fusion": [self.fusion_weight, self.fusion_bias], "label_embeddings": [self.labels]}

    def num_trainable(self):
        return sum(p.numel() // self.members for _, p in self.member_parameters())

    def trainable_state_dict(self, member: int = 0):
        return {k: v[member].detach().clone() for k, v in self.member_parameters()}

    def load_trainable_state_dict(self, sd, member: int = 0):
        own = dict(self.member_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                own[k][member].copy_(v)


def member_states(model, precision=None, **train):
    """Each member's TrialState: torch's optimiser (the `paper` preset, lr 0.1 and no warm-up epoch unless `train` says
    otherwise: the schedule sets the lr when it is built) over its views, and in fp16 its own GradScaler."""
    from hisf.config import TrainConfig
    from hisf.engine.checkpoint import TrialState
    from hisf.engine.optim import member_optimizer

    cfg = TrainConfig(**{"preset": "paper", "precision": "fp32", "lr": 0.1, "warmup_epochs": 0, **train})
    states = []
    for k in range(model.members):
        optimizer, scheduler, pairs = member_optimizer(model, k, cfg)
        scaler = precision.new_scaler() if precision is not None else None
        states.append(TrialState(model, optimizer, scheduler, scaler, member=k, pairs=pairs))
    return states


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
    return build_demo_shards(base, classes=classes, train=train, val=val, test=test, size=size, image_size=image_size)


def write_yaml(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def final_metrics(out: Path) -> dict:
    """The `final` block a finished trial wrote to OUT/metrics.json."""
    return json.loads((out / "metrics.json").read_text())["final"]


KILLER = """
import os, signal, sys
from hisf.config import TrialConfig
from hisf.engine import TrialCallback, run_trial

class KillAt(TrialCallback):
    def on_progress(self, step, total, metrics):
        if step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

run_trial(TrialConfig.from_yaml(sys.argv[1]), [KillAt()])
"""


def kill_then_finish(demo_root, tmp_path, sections: dict, timeout: int = 240) -> dict[str, str]:
    """Two copies of a 3-epoch x 3-step trial: `killed` is SIGKILLed at step 5 (inside epoch 2, after epoch 1's
    checkpoint, which is checked) and rerun; `whole` runs uninterrupted. Returns each rerun's stderr."""
    killed = write_yaml(tmp_path / "killed.yaml", tiny_trial_dict(demo_root, tmp_path / "killed", **sections))
    whole = write_yaml(tmp_path / "whole.yaml", tiny_trial_dict(demo_root, tmp_path / "whole", **sections))

    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), "5"], env=child_env(), cwd=WORKTREE,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "killed" / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert not [p for p in (tmp_path / "killed" / "checkpoint").iterdir() if p.name != "state.pt"]

    logs = {}
    for name, cfg in (("killed", killed), ("whole", whole)):
        proc = subprocess.run([sys.executable, "-m", "hisf.train", str(cfg)], env=child_env(), cwd=WORKTREE,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = proc.stderr
    return logs
