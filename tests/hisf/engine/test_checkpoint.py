"""Atomic checkpoint writes, RNG round trips, the TrialState saved and restored whole, resume identity checks
(config, global batch, data, class set), prompt export."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from hisf.config import ConfigError, TrialConfig, replace_path
from hisf.engine import checkpoint as ckpt
from hisf.engine.atomic import atomic_save
from hisf.engine.export import export_prompts, load_prompts
from tests.hisf.engine.helpers import TinyPromptModel


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"x": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"x": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(3); np.random.seed(3); torch.manual_seed(3)
    atomic_save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _ident(cfg, world_size=1, data=None):
    return ckpt.ResumeIdentity.of(cfg, world_size, data or {"caltech101": "0123456789abcdef"})


def _trial_state(model, epoch=2):
    from hisf.config import TrainConfig
    from hisf.engine.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(TrainConfig(preset="adamw"), model.param_groups())
    return ckpt.TrialState(model, optimizer, build_scheduler(optimizer, TrainConfig()), epoch=epoch,
                           history=[{"epoch": 0}, {"epoch": 1}], global_step=6, skipped_steps=1, train_seconds=2.5)


def test_load_checkpoint_checks_config_and_classes(tmp_path, tiny_model):
    cfg = TrialConfig(output_dir=str(tmp_path))
    names = ("cat", "dog")
    assert ckpt.load_checkpoint(tmp_path, _ident(cfg), names) is None
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / ".state.pt.abc123.tmp").write_bytes(b"half a checkpoint from a killed writer")
    ckpt.save_checkpoint(tmp_path, _trial_state(tiny_model), _ident(cfg), names)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["state.pt"]
    assert ckpt.load_checkpoint(tmp_path, _ident(cfg), names)["epoch"] == 2
    # Runtime-only keys may change between a kill and the restart.
    moved = replace_path(replace_path(cfg, "device", "cpu"), "data.num_workers", 2)
    assert ckpt.load_checkpoint(tmp_path, _ident(moved), names)["epoch"] == 2
    # ... so may where the backbone's weights are cached (`--weights-cache` on the rerun), not which they are.
    assert ckpt.load_checkpoint(tmp_path, _ident(replace_path(cfg, "backbone.cache_dir", "/shared/w")), names)["epoch"] == 2
    with pytest.raises(ConfigError, match=r"backbone.pretrained is 'openai' there, 'laion2b' now"):
        ckpt.load_checkpoint(tmp_path, _ident(replace_path(cfg, "backbone.pretrained", "laion2b")), names)
    with pytest.raises(ConfigError, match=r"method.lambda_le is 1.0 there, 0.5 now"):
        ckpt.load_checkpoint(tmp_path, _ident(replace_path(cfg, "method.lambda_le", 0.5)), names)
    with pytest.raises(ConfigError, match=r"data.dataset is 'caltech101' there, 'dtd' now"):
        ckpt.load_checkpoint(tmp_path, _ident(replace_path(cfg, "data.dataset", "dtd")), names)
    with pytest.raises(ConfigError, match=r"class set \(2 classes.*\(3, first"):
        ckpt.load_checkpoint(tmp_path, _ident(cfg), ("cat", "dog", "bird"))


def test_resume_identity_holds_the_global_batch_and_the_data(tmp_path, tiny_model):
    cfg = TrialConfig(output_dir=str(tmp_path))
    ckpt.save_checkpoint(tmp_path, _trial_state(tiny_model), _ident(cfg), ("cat",))
    # Two ranks of the same YAML: 8 samples a step instead of 4, so other steps and another number of them.
    with pytest.raises(ckpt.ResumeError, match=r"the global batch is 4 there \(1 rank\(s\) x 4\), 8 now \(2 rank\(s\) x 4\)"
                       ) as err:
        ckpt.load_checkpoint(tmp_path, _ident(cfg, world_size=2), ("cat",))
    assert err.value.path == ckpt.checkpoint_path(tmp_path)
    with pytest.raises(ckpt.ResumeError, match=r"train.batch_size is 4 there, 2 now; the global batch is 4 there "
                                               r"\(1 rank\(s\) x 4\), 4 now \(2 rank\(s\) x 2\)"):
        ckpt.load_checkpoint(tmp_path, _ident(replace_path(cfg, "train.batch_size", 2), world_size=2), ("cat",))
    with pytest.raises(ckpt.ResumeError, match=r"dataset 'caltech101' is build 0123456789abcdef there, fedcba9876543210 now"):
        ckpt.load_checkpoint(tmp_path, _ident(cfg, data={"caltech101": "fedcba9876543210"}), ("cat",))
    with pytest.raises(ckpt.ResumeError, match=r"dataset 'dtd' is build not opened there, 00ff00ff00ff00ff now"):
        ckpt.load_checkpoint(tmp_path, _ident(cfg, data={"caltech101": "0123456789abcdef", "dtd": "00ff00ff00ff00ff"}),
                             ("cat",))


def test_trial_state_is_saved_and_restored_whole(tmp_path, tiny_model, tiny_batch):
    saved = _trial_state(tiny_model)
    images, labels = tiny_batch
    saved.model.forward_losses(images, labels)["loss"].backward()
    saved.optimizer.step()
    saved.scheduler.step()
    cfg = TrialConfig(output_dir=str(tmp_path))
    ckpt.save_checkpoint(tmp_path, saved, _ident(cfg), ("a", "b", "c"))
    fresh = _trial_state(TinyPromptModel(seed=4), epoch=0)
    fresh.history, fresh.global_step, fresh.skipped_steps, fresh.train_seconds = [], 0, 0, 0.0
    assert ckpt.resume(tmp_path, fresh, _ident(cfg), ("a", "b", "c"))
    assert fresh.counters() == saved.counters()
    assert all(torch.equal(v, saved.model.trainable_state_dict()[k]) for k, v in fresh.model.trainable_state_dict().items())
    assert fresh.scheduler.state_dict() == saved.scheduler.state_dict()
    exp_avg = [fresh.optimizer.state[p]["exp_avg"] for g in fresh.optimizer.param_groups for p in g["params"]]
    assert [torch.equal(a, b) for a, b in zip(exp_avg, (saved.optimizer.state[p]["exp_avg"] for g in
                                                         saved.optimizer.param_groups for p in g["params"]))] == [True] * 6
    assert not ckpt.resume(tmp_path / "elsewhere", fresh, _ident(cfg), ("a", "b", "c"))


def test_unreadable_checkpoints_are_named_and_never_unpickled(tmp_path, tiny_model):
    cfg = TrialConfig(output_dir=str(tmp_path))
    path = ckpt.checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("not a checkpoint")
    with pytest.raises(ckpt.ResumeError, match=rf"{path}: not a trial checkpoint we load: it is not a torch file"):
        ckpt.load_checkpoint(tmp_path, _ident(cfg), ("a",))
    torch.save({"version": 2, "payload": _Payload(tmp_path / "pwned")}, path)
    with pytest.raises(ckpt.ResumeError, match=r"it holds a pickled Python object \(posix.system\)") as err:
        ckpt.load_checkpoint(tmp_path, _ident(cfg), ("a",))
    assert "weights_only=False" not in str(err.value) and not (tmp_path / "pwned").exists()
    torch.save({"version": 1, "identity": {}}, path)
    with pytest.raises(ckpt.ResumeError, match=r"checkpoint format 1, expected 2"):
        ckpt.load_checkpoint(tmp_path, _ident(cfg), ("a",))


class _Payload:
    """Pickles as a call of os.system: what a malicious checkpoint would run if it were unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_clear_checkpoint_deletes_only_the_trials_checkpoint_folder(tmp_path, tiny_model):
    cfg = TrialConfig(output_dir=str(tmp_path / "run"))
    ckpt.save_checkpoint(tmp_path / "run", _trial_state(tiny_model), _ident(cfg), ("a",))
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert ckpt.clear_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json"]
    assert ckpt.clear_checkpoint(tmp_path / "run") is None
    # A checkpoint folder that is a link to somewhere else is not ours to delete.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep")
    (tmp_path / "run" / "checkpoint").symlink_to(tmp_path / "precious")
    with pytest.raises(ckpt.ResumeError, match="not a checkpoint folder of this trial"):
        ckpt.clear_checkpoint(tmp_path / "run")
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep"


def test_export_and_load_prompts(tmp_path, tiny_model):
    cfg = TrialConfig()
    path = export_prompts(tmp_path / "prompts.pt", tiny_model.trainable_state_dict(), cfg, ("a", "b", "c"))
    assert path.stat().st_size < 50_000

    other = TinyPromptModel(seed=5)
    assert not torch.equal(other.prompt, tiny_model.prompt)
    payload = load_prompts(path, other, cfg)
    assert payload["classnames"] == ["a", "b", "c"]
    for k, v in tiny_model.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[k], v)
    with pytest.raises(ConfigError, match="different method config"):
        load_prompts(path, other, replace_path(cfg, "method.depth", 3))
    assert load_prompts(path, other, replace_path(cfg, "backbone.cache_dir", "/elsewhere"))["classnames"] == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_prompts(tmp_path / "missing.pt", other)
    (tmp_path / "junk.pt").write_text("not prompts")
    with pytest.raises(ConfigError, match=r"junk.pt: not a prompts file we load: it is not a torch file"):
        load_prompts(tmp_path / "junk.pt", other)
    torch.save({"trainable": {"prompt": _Payload(tmp_path / "pwned")}}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"evil.pt: not a prompts file we load: it holds a pickled Python object "
                                          r"\(posix.system\)") as err:
        load_prompts(tmp_path / "evil.pt", other)
    assert "weights_only=False" not in str(err.value) and not (tmp_path / "pwned").exists()
