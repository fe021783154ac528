"""CI runs the GPU check end to end on the CPU (`scripts/gpu_check.sh OUT --cpu-smoke`), so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_summary_and_rows(tmp_path):
    from benchmarks.train_step import prompt_methods

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--cpu-smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-5000:]
    # At most 8 files, so a device session gets every one of them back.
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "summary.md", "gpu_check.log", "steps.tsv", "pytest.xml", "data_throughput.json",
        "train_step_eager.json", "train_step_default.json", "train_step_reduce-overhead.json"])

    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["tests", "train_step_eager", "train_step_default", "train_step_reduce-overhead",
                                     "data_throughput"]
    assert all(s[1] == "0" and 0 <= int(s[2]) <= int(s[3]) for s in steps), steps

    methods = prompt_methods()
    for mode in ("eager", "default", "reduce-overhead"):
        report = json.loads((out / f"train_step_{mode}.json").read_text())
        assert report["complete"] and report["mode"] == mode and report["device"] == "cpu"
        rows = report["rows"]
        # Eager times every prompt method; the compiled sub-runs time maple against the reference.
        assert [r["method"] for r in rows] == ["maple", *(methods if mode == "eager" else ["maple"])]
        assert rows[0]["kind"] == "reference"
        for r in rows:
            assert r["ms_per_step"] > 0 and r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_step"])
            assert r["first_loss"] > 0
        # Our maple and MaPLe's reference start from the same weights: the same first loss on the same batch.
        assert rows[1]["first_loss"] == pytest.approx(rows[0]["first_loss"], rel=1e-4)
        assert rows[1]["speedup_vs_reference"] == pytest.approx(rows[0]["ms_per_step"] / rows[1]["ms_per_step"])
    checks = json.loads((out / "train_step_eager.json").read_text())["loss_checks"]
    assert len(checks) == 1 and checks[0]["ours_fast"] == pytest.approx(checks[0]["maple_reference"], abs=1e-5)

    data = json.loads((out / "data_throughput.json").read_text())
    assert data["images"] >= 12 and data["eval_img_s_per_worker"] > 0 and data["train_aug_img_s_per_worker"] > 0

    summary = (out / "summary.md").read_text()
    for heading in ("## Sub-runs", "## CUDA tests", "## Training step", "## Data reader"):
        assert heading in summary
    assert "No test ran: every gpu test was deselected" in summary
    assert summary.count("| eager | ours_maple_fp32 |") == 1 and "(equal)" in summary
    assert "batch 4 / 50 classes: not measured (target >= 10x)" in summary
