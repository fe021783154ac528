"""A full disk in the middle of a real sweep: one line naming the file and ENOSPC, the stage stopped (no retries,
no later trial), what finished kept, and `--resume` completes once there is space again."""

import re
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import mlflow_children, run_cli, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Every process of the run (the driver, Ray's workers: PYTHONPATH reaches them) loads this at start. While the
# flag file exists, an fsync of a file under the watched folder fails as a full disk's does.
FULL_DISK = textwrap.dedent("""
    import errno, os
    _fsync = os.fsync
    def fsync(fd):
        if os.path.exists({flag!r}):
            try:
                path = os.readlink(f"/proc/self/fd/{{fd}}")
            except OSError:
                path = ""
            if path.startswith({watched!r}):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _fsync(fd)
    os.fsync = fsync
""")


def test_a_full_disk_stops_the_stage_with_one_line_and_resume_completes(tmp_path, demo_root, monkeypatch):
    spec = write_spec(tmp_path / "f.yaml", demo_root, name="full", epochs=2, max_concurrent=1, rows=[
        {"name": "CLIP", "method": {"name": "zeroshot"}}, {"name": "HISF", "method": {"name": "hisf", "depth": 2}},
        {"name": "CoOp", "method": {"name": "coop"}}])
    wd = tmp_path / "hisf-bench"
    hisf_dir = wd / "runs" / "full" / "sweep-hisf-demo-s1"
    flag = tmp_path / "disk-is-full"
    flag.write_text("")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK.format(flag=str(flag), watched=str(hisf_dir) + "/"))
    monkeypatch.setenv("PYTHONPATH", str(hook))  # cli_env() puts the repo first and keeps this

    out = run_cli(["sweep", spec], cwd=tmp_path, timeout=400)
    console = out.stdout + out.stderr
    assert out.returncode == 1, console[-4000:]
    assert "Traceback" not in console, console[-4000:]
    lines = [ln for ln in console.splitlines() if "ENOSPC" in ln or "No space left" in ln]
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"error: no space left on device writing {re.escape(str(hisf_dir))}/\S+ \(ENOSPC\); what "
                        rf"finished is kept: free space there, then continue with: hisf-bench sweep {re.escape(str(spec))} "
                        r"--resume", lines[0]), lines[0]

    uri = f"sqlite:///{wd / 'mlflow.db'}"
    runs = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "full")}
    assert runs["sweep-clip-demo-s1"].info.status == "FINISHED"
    hisf = runs["sweep-hisf-demo-s1"]
    assert hisf.info.status == "FAILED" and hisf.data.tags["hisf.error"].startswith("no space left on device writing")
    assert hisf.data.tags["hisf.attempts"] == "1"  # not retried (max_failures is 2)
    assert "sweep-coop-demo-s1" not in runs or runs["sweep-coop-demo-s1"].info.status == "KILLED"
    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("full").experiment_id])
                 if r.data.tags.get("hisf.kind") == "stage"]
    assert parent.info.status == "FAILED" and "DiskFull: no space left on device" in parent.data.tags["hisf.error"]

    flag.unlink()  # space again
    again = run_cli(["sweep", spec, "--resume"], cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "3 trials, 1 already finished, running 2" in again.stdout
    after = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "full")}
    assert sorted(after) == ["sweep-clip-demo-s1", "sweep-coop-demo-s1", "sweep-hisf-demo-s1"]
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert after["sweep-clip-demo-s1"].info.run_id == runs["sweep-clip-demo-s1"].info.run_id
    assert after["sweep-hisf-demo-s1"].info.run_id == hisf.info.run_id  # the same trial, continued
