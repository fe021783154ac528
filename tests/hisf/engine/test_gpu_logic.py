"""The GPU path's logic, tested on the CPU: device choice, per-rank CUDA RNG state, step accounting, deterministic mode."""

from __future__ import annotations

import math

import pytest
import torch

from hisf.engine import Precision, deterministic_mode, resolve_precision, train_step
from hisf.engine import checkpoint as ckpt
from hisf.engine.atomic import atomic_save
from hisf.engine.distributed import DistEnv, pick_device
from tests.hisf.engine.helpers import TinyPromptModel, member_states, tiny_trial

CPU1 = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)


# --- device choice (issue 11 items 3, 4, 7) --------------------------------------------------------------


@pytest.mark.parametrize("device, count, local_rank, world, current, expected", [
    ("auto", 0, 0, 1, None, "cpu"),
    ("auto", 2, 0, 1, None, "cuda:0"),
    ("cpu", 4, 0, 1, None, "cpu"),          # a trial given no GPU stays on the CPU on a GPU node
    ("cpu", 4, 3, 4, 3, "cpu"),
    ("cuda", 2, 0, 1, None, "cuda:0"),
    ("cuda:1", 2, 0, 1, None, "cuda:1"),
    ("auto", 1, 0, 1, 0, "cuda:0"),
    # Several ranks: the launcher's current device wins (Ray Train's GPU ids need not equal LOCAL_RANK) ...
    ("auto", 4, 1, 4, 3, "cuda:3"),
    # ... else one visible GPU per process means cuda:0 (not the invalid cuda:LOCAL_RANK) ...
    ("auto", 1, 3, 4, None, "cuda:0"),
    ("cuda", 1, 2, 4, None, "cuda:0"),
    # ... else the local rank.
    ("auto", 4, 2, 4, None, "cuda:2"),
    ("cuda", 8, 5, 8, None, "cuda:5"),
])
def test_pick_device(device, count, local_rank, world, current, expected):
    assert pick_device(device, cuda_devices=count, local_rank=local_rank, world_size=world, current=current) == \
        torch.device(expected)


def test_pick_device_ignores_an_explicit_index_under_ddp():
    # `device: cuda:0` on 4 ranks would put every rank on GPU 0 and NCCL would fail on the duplicate.
    with pytest.warns(UserWarning, match=r"'cuda:0' ignored for rank 2 of a 4-rank group; using cuda:2"):
        assert pick_device("cuda:0", cuda_devices=4, local_rank=2, world_size=4) == torch.device("cuda:2")


@pytest.mark.parametrize("device, count, local_rank, world, match", [
    ("cuda", 0, 0, 1, r"'cuda' asked for but CUDA is not available in this process"),
    ("cuda:0", 0, 0, 1, r"driver too old"),
    ("cuda:2", 2, 0, 1, r"'cuda:2' but this process sees 2 CUDA device\(s\).*expected cuda:0..cuda:1"),
    ("auto", 2, 3, 4, r"local rank 3 of 4 ranks but this process sees only 2 CUDA device"),
    ("mps", 1, 0, 1, r"unsupported device type 'mps'"),
    ("gpu0", 1, 0, 1, r"unknown device 'gpu0'"),
])
def test_pick_device_errors(device, count, local_rank, world, match):
    with pytest.raises(ValueError, match=match):
        pick_device(device, cuda_devices=count, local_rank=local_rank, world_size=world)


def test_the_chosen_cuda_device_becomes_current_in_every_process_kind(monkeypatch):
    """A single process given `cuda:1` makes it current (else the pin-memory thread and cuBLAS open a context
    on GPU 0); a CPU trial never touches CUDA. No GPU here: the device count and set_device are stand-ins."""
    from hisf.engine import distributed

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"'cuda:1' asked for but CUDA is not available"):
        distributed.init_from_env("cuda:1")  # the real (absent) CUDA: refused before any CUDA call
    calls = []
    monkeypatch.setattr(distributed, "cuda_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(torch.device(dev)))
    env = distributed.init_from_env("cuda:1")
    assert env.device == torch.device("cuda:1") and calls == [torch.device("cuda:1")]
    assert distributed.init_from_env("cpu").device == torch.device("cpu") and calls == [torch.device("cuda:1")]
    assert distributed.use_device(torch.device("cpu")) == torch.device("cpu") and len(calls) == 1


def test_pick_device_names_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES='5'"):
        pick_device("cuda:1", cuda_devices=1)


# --- per-rank CUDA RNG state (item 2) ------------------------------------------------------------------


def test_cuda_rng_state_per_rank_tolerates_another_world_size(tmp_path):
    states = [torch.full((16,), r, dtype=torch.uint8) for r in range(4)]
    atomic_save(ckpt.rng_state(states), tmp_path / "rng.pt")
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    cuda = saved["cuda"]
    assert [int(t[0]) for t in cuda] == [0, 1, 2, 3]
    # Each rank takes its own; a rank the saving run did not have (a retry with more ranks) takes rank 0's.
    assert [int(ckpt.cuda_state_for_rank(cuda, r)[0]) for r in range(6)] == [0, 1, 2, 3, 0, 0]
    # Older single-tensor and CPU-written (absent) states.
    assert int(ckpt.cuda_state_for_rank(torch.full((16,), 7, dtype=torch.uint8), 3)[0]) == 7
    assert ckpt.cuda_state_for_rank(None, 2) is None and ckpt.cuda_state_for_rank([], 0) is None
    # A CPU trial restoring a GPU-written checkpoint restores the host generators and leaves CUDA alone.
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    state = ckpt.rng_state(states)
    torch.rand(3)
    ckpt.set_rng_state(state, rank=9, device=torch.device("cpu"))
    assert torch.equal(torch.rand(2), expected)
    assert "cuda" not in ckpt.rng_state(None)


# --- step accounting agrees across precisions (item 11) ------------------------------------------------


class _LoggedNaN(TinyPromptModel):
    """loss_sa is logged but not optimised (a zero weight keeps it out of `loss`), and it is NaN;
    with `nan_loss` the optimised loss is NaN while every gradient stays finite."""

    def __init__(self, nan_loss: bool = False):
        super().__init__()
        self.nan_loss = nan_loss

    def forward_losses(self, images, labels):
        out = super().forward_losses(images, labels)
        loss = out["loss_cls"] + 0.5 * out["loss_le"]
        if self.nan_loss:
            loss = loss + torch.tensor(float("nan"))  # a constant: no gradient flows through it
        return {**out, "loss": loss, "loss_sa": out["loss_sa"] * float("nan")}


def _precisions():
    return {"fp32": resolve_precision("fp32", torch.device("cpu")),
            "bf16": resolve_precision("bf16", torch.device("cpu")),
            # fp16's scaler logic on the CPU (CPU autocast left out; what differs is the scaler path)
            "fp16": Precision("fp16", "cpu", None, grad_scaling=True)}


def _states(model, prec):
    """The one member's state; fp16's GradScaler starts at 1024 (the default 65536 would overflow at once)."""
    states = member_states(model, prec)
    if prec.grad_scaling:
        states[0].scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return states


def test_a_nonfinite_logged_only_term_steps_in_every_precision(tiny_batch):
    images, labels = tiny_batch
    after = {}
    for name, prec in _precisions().items():
        model = _LoggedNaN()
        states = _states(model, prec)
        before = model.trainable_state_dict()
        (res,) = train_step(model, images, labels, states, prec, CPU1)
        assert math.isnan(res.losses["loss_sa"]) and math.isfinite(res.losses["loss"]), name
        assert (res.finite, res.skipped) == (True, False), name
        after[name] = model.trainable_state_dict()
        assert any(not torch.equal(after[name][k], before[k]) for k in before), name
    for k, v in after["fp32"].items():
        torch.testing.assert_close(after["fp16"][k], v, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(after["bf16"][k], v, rtol=0.05, atol=0.02)


def test_a_nonfinite_loss_with_finite_grads_never_steps(tiny_batch):
    images, labels = tiny_batch
    for name, prec in _precisions().items():
        model = _LoggedNaN(nan_loss=True)
        states = _states(model, prec)
        before = model.trainable_state_dict()
        (res,) = train_step(model, images, labels, states, prec, CPU1)
        assert (res.finite, res.skipped) == (False, True), name
        for k, v in model.trainable_state_dict().items():
            assert torch.equal(v, before[k]), (name, k)
        if states[0].scaler is not None:
            assert states[0].scaler.get_scale() == 1024.0  # the grads were finite: no back-off
        # The scaler's per-step state was reset, so the next (finite) step runs and updates.
        model.nan_loss = False
        (res,) = train_step(model, images, labels, states, prec, CPU1)
        assert not res.skipped, name
        assert any(not torch.equal(model.trainable_state_dict()[k], before[k]) for k in before), name


# --- deterministic mode (item 12) ----------------------------------------------------------------------


def test_deterministic_mode_sets_and_restores_the_flags(monkeypatch):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul, sdp = torch.backends.cudnn, torch.backends.cuda.matmul, torch.backends.cuda
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32, sdp.mem_efficient_sdp_enabled())
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, True, True
    sdp.enable_mem_efficient_sdp(False)  # a process's own backend choice, to be given back as it was
    q = torch.randn(2, 4, 8, 16)
    try:
        before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic)
        backends_before = (sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(), sdp.math_sdp_enabled(),
                           sdp.cudnn_sdp_enabled())
        with deterministic_mode(False):
            assert (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark) == (before[0], True)
            assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
            assert sdp.flash_sdp_enabled() == backends_before[0]
        with deterministic_mode(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (True, False, False, False)
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            # Attention on the math backend only (flash and memory-efficient backwards are not deterministic):
            # the dispatcher picks it, here on the CPU as it would on a GPU.
            assert (sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(), sdp.math_sdp_enabled(),
                    sdp.cudnn_sdp_enabled()) == (False, False, True, False)
            assert torch._fused_sdp_choice(q, q, q) == int(torch.nn.attention.SDPBackend.MATH)
        assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic) == before
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (True, True, True)
        assert (sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(), sdp.math_sdp_enabled(),
                sdp.cudnn_sdp_enabled()) == backends_before
        assert backends_before[1] is False and torch._fused_sdp_choice(q, q, q) != int(torch.nn.attention.SDPBackend.MATH)
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[:3]
        sdp.enable_mem_efficient_sdp(saved[3])


@pytest.mark.parametrize("preset, cuda_started, kept, warning", [
    (None, False, ":4096:8", None),  # a fresh process: set in time
    (None, True, ":4096:8", "CUDA is already initialised in this process"),  # a reused worker: too late, said so
    (":16:8", True, ":16:8", None),  # set where the process started (Ray's runtime env, torchrun's prefix)
    (":4096:2", False, ":4096:2", "none of cuBLAS's deterministic settings"),
])
def test_cublas_workspace_is_set_or_the_log_says_why_not(monkeypatch, caplog, preset, cuda_started, kept, warning):
    import logging
    import os

    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    # No GPU here: whether CUDA (and so possibly cuBLAS) already started in this process is what is faked.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_started)
    with caplog.at_level(logging.WARNING, logger="hisf.engine"):
        with deterministic_mode(True):
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == kept
    found = [r.getMessage() for r in caplog.records if "CUBLAS_WORKSPACE_CONFIG" in r.getMessage()]
    if warning is None:
        assert found == []
    else:
        assert len(found) == 1 and warning in found[0] and "train.deterministic" in found[0], found


def test_train_deterministic_is_a_checked_runtime_key():
    from hisf.config import ConfigError, TrialConfig

    cfg = TrialConfig.from_dict({"train": {"deterministic": True}})
    assert cfg.train.deterministic is True
    assert "train.deterministic" not in ckpt.identity(cfg)  # a resume may switch it
    with pytest.raises(ConfigError, match=r"train.deterministic: expected true or false, got 'yes'"):
        TrialConfig.from_dict({"train": {"deterministic": "yes"}})


@pytest.mark.parametrize("train, store", [("bf16", "bf16 or fp32"), ("fp32", "fp32")])
def test_an_fp16_backbone_trains_only_with_fp16_loss_scaling(train, store):
    from hisf.config import ConfigError, TrialConfig

    with pytest.raises(ConfigError, match=rf"backbone.precision: 'fp16' storage with train.precision '{train}' trains "
                                          rf"without loss scaling.*set train.precision: fp16 .*backbone.precision: {store}$"):
        TrialConfig.from_dict({"backbone": {"precision": "fp16"}, "train": {"precision": train}})
    assert TrialConfig.from_dict({"backbone": {"precision": "fp16"}, "train": {"precision": "fp16"}}).backbone.precision == "fp16"
    assert TrialConfig.from_dict({"backbone": {"precision": "bf16"}, "train": {"precision": train}}).train.precision == train


def test_an_fp16_backbone_under_the_cpus_bf16_fallback_is_stored_in_bf16(demo_root, tmp_path, caplog):
    import logging

    from hisf.engine import run_trial
    from hisf.engine.build import _backbone_storage

    cfg = tiny_trial(demo_root, tmp_path, backbone={"precision": "fp16"}, train={"epochs": 1, "precision": "fp16"})
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        cpu = resolve_precision("fp16", torch.device("cpu"))
    assert _backbone_storage(cfg, cpu).precision == "bf16"
    assert _backbone_storage(cfg, Precision("fp16", "cuda", torch.float16, grad_scaling=True)) is cfg.backbone
    with caplog.at_level(logging.WARNING, logger="hisf.engine"), pytest.warns(UserWarning, match="fp16 needs CUDA"):
        result = run_trial(cfg)
    assert math.isfinite(result["train/loss"])
    assert any("storing the backbone in bf16 instead" in r.getMessage() for r in caplog.records)


# --- host-side label check and pinned batches (items 8, 9) ---------------------------------------------


def test_labels_are_checked_on_the_host_once_per_subset(demo_root, tmp_path):
    import dataclasses

    import numpy as np

    from hisf.engine.trial_data import check_labels, open_trial_data

    data = open_trial_data(tiny_trial(demo_root, tmp_path), CPU1)
    n = len(data.train.classnames)
    check_labels(data.train, n, "train")  # the real subset is consistent
    bad = dataclasses.replace(data.train, labels=np.where(np.arange(len(data.train)) == 5, n, data.train.labels))
    with pytest.raises(ValueError, match=rf"train: label {n} of the 'train' subset at .* lies outside the model's "
                                         rf"{n} classes \(expected 0..{n - 1}; 1 bad label"):
        check_labels(bad, n, "train")
    with pytest.raises(ValueError, match=r"label -1 "):
        check_labels(dataclasses.replace(data.val, labels=data.val.labels - 1), n, "val")
    # A model over fewer classes than the subset's labels (a wrong class set) is caught the same way.
    with pytest.raises(ValueError, match=rf"outside the model's {n - 1} classes"):
        check_labels(data.train, n - 1, "train")


def test_loaders_pin_memory_only_for_a_cuda_trial(demo_root, tmp_path):
    from hisf.engine.trial_data import open_trial_data

    cfg = tiny_trial(demo_root, tmp_path)
    for device, pinned in (("cpu", False), ("cuda:0", True)):
        # No CUDA call happens until a batch is read, so a CUDA trial's loaders can be built here.
        data = open_trial_data(cfg, DistEnv(0, 1, 0, torch.device(device), False))
        data.image_size, data.mean, data.std = 32, (0.5,) * 3, (0.25,) * 3
        assert data.train_loader(epoch=0).pin_memory is pinned
        assert data.val_loader().pin_memory is pinned


def test_check_device_names_the_device_or_says_why_it_is_unusable():
    from hisf.engine.distributed import check_device

    assert check_device(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        assert check_device(torch.device("cuda:0")) == f"cuda:0 ({torch.cuda.get_device_name(0)})"
    else:
        # A GPU this torch cannot use (here: none at all) fails with the reason instead of a silent CPU trial.
        with pytest.raises(RuntimeError, match=r"device cuda:0: assigned but unusable by torch .*\(CUDA .*\): "):
            check_device(torch.device("cuda:0"))


def test_a_deterministic_trial_runs_and_leaves_the_process_flags_as_they_were(demo_root, tmp_path):
    from hisf.engine import run_trial

    before = torch.are_deterministic_algorithms_enabled()
    result = run_trial(tiny_trial(demo_root, tmp_path, train={"epochs": 1, "deterministic": True}))
    assert math.isfinite(result["train/loss"]) and 0.0 <= result["hm"] <= 100.0
    assert torch.are_deterministic_algorithms_enabled() == before
