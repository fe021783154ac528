"""A trial's device on a Ray node follows its resources: CPU without GPUs, Ray's GPU with them, a share of its memory."""

from __future__ import annotations

import pytest

from orchestrator.devices import memory_fraction, trial_device
from orchestrator.spec import SpecError, parse_spec
from tests.orchestrator.helpers import demo_raw
from tests.support import ROOT


@pytest.mark.parametrize("gpus, ids, visible, configured, expected", [
    # No GPU asked for: the CPU, even though Ray 2.60 leaves the node's GPUs visible to the process.
    (0, [], "0,1,2,3", "auto", "cpu"),
    (0, [], None, "cuda", "cpu"),
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU: it is the process's cuda:0 whatever its node id.
    (0.5, [3], "3", "auto", "cuda:0"),
    (1, ["2"], "2", "cuda:1", "cuda:0"),
    # A Ray Train worker sees its node's workers' GPUs; it uses its own by position.
    (1, [6], "4,5,6,7", "auto", "cuda:2"),
    (1, ["GPU-9ab"], "GPU-1cd,GPU-9ab", "auto", "cuda:1"),
    # CUDA_VISIBLE_DEVICES unset (or Ray's "no devices" marker): the id is the ordinal.
    (1, [1], None, "auto", "cuda:1"),
    (1, [1], "NoDevFiles", "auto", "cuda:1"),
    # An explicit cpu in the spec stays on the CPU.
    (0.25, [0], "0", "cpu", "cpu"),
])
def test_trial_device(gpus, ids, visible, configured, expected):
    assert trial_device(gpus, ids, visible, configured) == expected


@pytest.mark.parametrize("gpus, ids, visible, match", [
    (0.5, [], "", r"gpus_per_trial is 0.5 but Ray assigned this trial no GPU"),
    (1, [5], "0,1", r"Ray assigned GPU 5 but CUDA_VISIBLE_DEVICES='0,1' does not list it"),
    (1, ["GPU-9ab"], None, r"no CUDA ordinal"),
])
def test_trial_device_errors(gpus, ids, visible, match):
    with pytest.raises(RuntimeError, match=match):
        trial_device(gpus, ids, visible)


def test_memory_fraction_is_the_trials_share_of_its_gpu():
    assert [memory_fraction(g) for g in (0, 0.25, 0.5, 1, 1.0)] == [None, 0.25, 0.5, None, None]


def _with(resources=None, data=None):
    raw = demo_raw()
    raw["resources"].update(resources or {})
    raw["data"].pop("num_workers", None)
    raw["data"].update(data or {})
    return raw


@pytest.mark.parametrize("gpus, workers", [(2, 1), (4, 4), (2.0, 2)])
def test_more_than_one_gpu_per_worker_is_rejected(gpus, workers):
    raw = _with({"gpus_per_trial": gpus, "workers_per_trial": workers})
    with pytest.raises(SpecError, match=rf"resources.gpus_per_trial: {gpus:g} GPUs per worker, but a worker uses one "
                                        rf"device.*workers_per_trial: {gpus:g} and gpus_per_trial: 1"):
        parse_spec(raw)
    assert parse_spec(_with({"gpus_per_trial": 1, "workers_per_trial": 4})).resources.workers_per_trial == 4


def test_default_loader_workers_follow_the_resources():
    # Left out on a GPU trial: every CPU but the training thread's decodes; on a CPU trial none.
    assert parse_spec(_with({"gpus_per_trial": 0.5, "cpus_per_trial": 4})).data.num_workers == 3
    assert parse_spec(_with({"gpus_per_trial": 1, "cpus_per_trial": 1})).data.num_workers == 1
    assert parse_spec(_with({"gpus_per_trial": 0, "cpus_per_trial": 4})).data.num_workers == 0
    # Set explicitly, it is kept.
    assert parse_spec(_with({"gpus_per_trial": 0.5, "cpus_per_trial": 4}, {"num_workers": 0})).data.num_workers == 0


def test_a_fractional_trial_leaves_room_for_what_sits_outside_the_allocator():
    from orchestrator.devices import CUBLAS_MIB, CUDA_CONTEXT_MIB, NCCL_MIB, allocator_cap

    gib = 2**30
    # Half an H200 (139.8 GiB): the allocator gets 69.9 GiB less the CUDA context and cuBLAS (768 MiB).
    cap, reserved = allocator_cap(0.5, int(139.8 * gib))
    assert reserved == CUDA_CONTEXT_MIB + CUBLAS_MIB == 768
    assert cap * 139.8 * gib == pytest.approx(0.5 * 139.8 * gib - 768 * 2**20)
    # Two such trials, each with its context, fit on the card: the point of the reserve.
    assert 2 * (cap * 139.8 * gib + reserved * 2**20) <= 139.8 * gib + 1
    # A DDP worker also keeps NCCL's buffers out.
    cap_ddp, reserved_ddp = allocator_cap(0.5, int(139.8 * gib), workers=2)
    assert reserved_ddp == reserved + NCCL_MIB and cap_ddp < cap
    # A quarter of a 16 GiB card: 4 GiB less 0.75 GiB.
    assert allocator_cap(0.25, 16 * gib)[0] == pytest.approx((4 * gib - 768 * 2**20) / (16 * gib))


def test_a_share_too_small_to_train_in_is_a_config_error():
    from hisf.config import ConfigError
    from orchestrator.devices import allocator_cap

    with pytest.raises(ConfigError, match=r"resources.gpus_per_trial 0.1 of a 8.0 GiB GPU leaves 51 MiB for tensors once "
                                          r"768 MiB are kept for the CUDA context, cuBLAS \(outside"):
        allocator_cap(0.1, 8 * 2**30)
    with pytest.raises(ConfigError, match=r"cuBLAS and NCCL"):
        allocator_cap(0.1, 16 * 2**30, workers=2)


def test_workers_start_with_a_deterministic_cublas_workspace(monkeypatch):
    import os
    from pathlib import Path

    from orchestrator.scheduling import worker_env

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    env = worker_env()
    assert Path(env["PYTHONPATH"].split(os.pathsep)[0]) == ROOT
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the driver's own choice travels instead
    assert worker_env()["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
