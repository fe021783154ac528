"""A trial's device on a Ray node follows its resources: CPU without GPUs, Ray's GPU with them, a share of its memory."""

from __future__ import annotations

import pytest

from orchestrator.devices import memory_fraction, trial_device
from orchestrator.spec import SpecError, parse_spec
from test_spec import demo_raw


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
