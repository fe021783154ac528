"""The environment record of a run (`env.*` tags) and the report's view of a table's environments, from real MLflow runs."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

from orchestrator.environment import PACKAGES, environment_tags, git_state, nvidia_driver
from orchestrator.report import build_report, plan_from_dict
from tests.orchestrator.report.helpers import spec_dict, write_store
from tests.support import ROOT


def test_environment_tags_record_where_the_trial_ran():
    tags = environment_tags("bf16", None, device_name="cpu")
    assert tags["env.python"] == platform.python_version()
    assert tags["env.torch"] == torch.__version__ and tags["env.cuda"] == (torch.version.cuda or "none")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    assert tags["env.cudnn"] == (str(cudnn) if cudnn else "none")
    for dist in PACKAGES:
        assert tags[f"env.{dist}"] == importlib.metadata.version(dist), dist
    assert (tags["env.precision"], tags["env.compile"], tags["env.device"]) == ("bf16", "off", "cpu")
    assert environment_tags("fp16", "reduce-overhead")["env.compile"] == "reduce-overhead"
    assert environment_tags("fp16", True)["env.compile"] == "default" and "env.device" not in environment_tags("fp16", True)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert tags["env.gpu_count"] == str(count)
    if not count:
        assert (tags["env.gpu"], tags["env.gpu_memory_gib"]) == ("none", "none")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    assert tags["env.git_commit"] == head and tags["env.git_dirty"] == ("true" if dirty else "false")
    assert all(isinstance(v, str) and v for v in tags.values())


def test_driver_is_none_without_nvidia_smi_and_read_from_it_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on the path
    assert nvidia_driver() == "none"
    # A stand-in for the tool (this machine has no GPU): what nvidia-smi prints for that query.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '550.54.15\\n550.54.15\\n'\n")
    fake.chmod(0o755)
    assert nvidia_driver() == "550.54.15"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n")
    assert nvidia_driver() == "none"


def test_git_state_outside_a_checkout_is_unknown(tmp_path):
    assert git_state(tmp_path) == ("unknown", "unknown")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "a.txt").write_text("1")
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-q", "-m", "one"], check=True, env=env)
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and dirty == "false"
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path) == (commit, "true")


H200 = {"env.torch": "2.11.0+cu130", "env.cuda": "13.0", "env.cudnn": "91002", "env.gpu": "NVIDIA H200",
        "env.gpu_count": "1", "env.python": "3.12.3", "env.open_clip_torch": "3.3.0", "env.precision": "fp16",
        "env.compile": "off", "env.git_commit": "a" * 40, "env.git_dirty": "false", "env.driver": "570.86.15",
        "env.hostname": "node-1"}


def _report(tmp_path, tags_for):
    spec = spec_dict(datasets=("caltech101",), seeds=(1, 2))
    uri, _, runs = write_store(tmp_path, spec, extra_tags=tags_for)
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    return report, runs


def test_a_table_from_one_environment_lists_it_without_a_warning(tmp_path):
    report, runs = _report(tmp_path, lambda row, dataset, seed: {**H200, "env.hostname": f"node-{seed}"})
    envs = report.environments
    assert not envs.mixed and envs.note() is None and envs.unrecorded == ()
    assert len(envs.environments) == 1 and len(envs.environments[0].run_ids) == len(runs) == 6
    assert envs.environments[0].hosts == ("node-1", "node-2")  # another host with the same stack does not split
    md = report.tables["md"].read_text()
    assert "## Environments" in md and "| torch | 2.11.0+cu130 |" in md and "mixes" not in md
    index = report.index.read_text()
    assert 'id="environments"' in index and "NVIDIA H200" in index and 'class="mixed"' not in index


def test_a_table_mixing_environments_is_flagged_with_what_differs(tmp_path):
    def tags_for(row, dataset, seed):
        if (row, seed) == ("MaPLe", 2):  # one run elsewhere: another torch on another GPU
            return {**H200, "env.torch": "1.13.1+cu117", "env.cuda": "11.7", "env.gpu": "NVIDIA A100-SXM4-40GB"}
        if (row, seed) == ("CLIP", 1):
            return {}  # tracked before runs recorded their environment
        return H200

    report, runs = _report(tmp_path, tags_for)
    envs = report.environments
    assert envs.mixed and envs.differing == ("torch", "cuda", "gpu")
    assert [len(e.run_ids) for e in envs.environments] == [4, 1]
    assert envs.environments[1].run_ids == (runs[("MaPLe", (), "caltech101", 2)][0],)
    assert envs.environments[1].cells == ("MaPLe on caltech101",)
    assert envs.unrecorded == (runs[("CLIP", (), "caltech101", 1)][0],)
    note = envs.note()
    assert note == ("This table mixes runs from 2 environments (torch 2.11.0+cu130 vs 1.13.1+cu117; cuda 13.0 vs 11.7; "
                    "gpu NVIDIA H200 vs NVIDIA A100-SXM4-40GB) and 1 run(s) without an environment record: compare "
                    "its cells with care.")
    md = report.tables["md"].read_text()
    assert md.splitlines()[2] == f"**{note}** (see Environments below)"
    assert "| torch (differs) | 2.11.0+cu130 | 1.13.1+cu117 |" in md and "| python | 3.12.3 | 3.12.3 |" in md
    index = report.index.read_text()
    assert 'class="mixed"' in index and "1.13.1+cu117" in index and '<tr class="differs"><th>gpu</th>' in index


def test_the_report_command_warns_about_a_mixed_table(tmp_path, capsys):
    import yaml

    from orchestrator.report import main

    spec = spec_dict(datasets=("caltech101",), seeds=(1,))
    uri, _, _ = write_store(tmp_path, spec, extra_tags=lambda row, d, s: {**H200, "env.compile": row.lower()})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--workdir", str(tmp_path), "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "warning: This table mixes runs from 3 environments (compile clip vs maple vs hisf)" in out
