"""CI runs the GPU check end to end on the CPU (`scripts/gpu_check.sh OUT --cpu-smoke`), so the script cannot rot;
its pieces that matter when a GPU run is cut short (JSONL rows, per-test outcomes, the summary) are tested here too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = ["summary.md", "gpu_check.log", "steps.tsv", "tests.jsonl", "train_step.jsonl", "fusion.jsonl",
         "data_throughput.json"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_summary_and_rows(tmp_path):
    from benchmarks.gpu_summary import read_jsonl
    from benchmarks.train_step import prompt_methods

    out = tmp_path / "out"
    out.mkdir()
    (out / "train_step_eager.tmp").write_text("left by an older version")  # cleaned, as the script's own file
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-smoke"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-5000:]
    # At most 8 files, none in a sub-folder, so a device session gets every one of them back.
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    # The summary ends the output (a device session returns the output's tail).
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())

    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["setup", "train_step_eager", "train_step_reduce-overhead", "train_step_default",
                                     "fusion_eager", "fusion_compiled", "tests", "data_throughput"]
    assert all(s[1] == "0" and 0 <= int(s[2]) and (s[0] == "setup" or int(s[2]) <= int(s[3])) for s in steps), steps

    # Trial fusion's rows: fused against one after another, on the GPU's fp16 path, each member's loss its own.
    fused = [r for r in read_jsonl(out / "fusion.jsonl") if r["record"] == "row"]
    assert [(r["compile"], r["method"], r["k"]) for r in fused] == [
        ("eager", "maple", 1), ("eager", "maple", 8), ("eager", "hisf", 1), ("eager", "hisf", 8),
        ("reduce-overhead", "maple", 8)]
    assert all(r["precision"] == "fp16" and r["fused_ms"] > 0 and r["sequential_ms"] > 0 for r in fused)
    assert all(r["loss_diff"] < 1e-2 for r in fused)
    assert "## Trial fusion" in summary and "Target: K = 8 fused maple" in summary

    records = read_jsonl(out / "train_step.jsonl")
    runs = [r for r in records if r["record"] == "run"]
    assert [r["mode"] for r in runs] == ["eager", "reduce-overhead", "default"]
    assert all(r["precision"] == "fp16" and r["reference_precision"] == "fp16" for r in runs)
    assert [r["complete"] for r in records if r["record"] == "end"] == [True, True, True]
    rows = {mode: [r for r in records if r["record"] == "row" and r["run"] == mode] for mode in ("eager", "reduce-overhead", "default")}
    methods = prompt_methods()
    # The target shape first and whole, then the other shape; MaPLe's reference in its fp16 storage.
    assert [(r["kind"], r["method"], r["batch"], r["classes"]) for r in rows["eager"]] == (
        [("reference", "maple", 4, 50), *(("ours", m, 4, 50) for m in methods),
         ("reference", "maple", 2, 5), *(("ours", m, 2, 5) for m in methods)])
    for r in rows["eager"]:
        assert r["ms_per_step"] > 0 and r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_step"])
        assert r["first_loss"] > 0
        assert r["formulation"] == ("maple_reference_fp16" if r["kind"] == "reference" else f"ours_{r['method']}_fp16")
    ref = {(r["batch"], r["classes"]): r for r in rows["eager"] if r["kind"] == "reference"}
    for r in rows["eager"] + rows["reduce-overhead"] + rows["default"]:
        if r["kind"] == "ours" and r["method"] == "maple":
            # Our fp16 maple and MaPLe's fp16 formulation start from the same weights: the same first loss up to
            # half precision; the speed-up is against that reference.
            want = ref[(r["batch"], r["classes"])]
            assert r["first_loss"] == pytest.approx(want["first_loss"], rel=1e-2)
            assert r["speedup_vs_reference"] == pytest.approx(want["ms_per_step"] / r["ms_per_step"])
    # The compiled sub-runs time maple only and take the reference timings from the eager sub-run.
    assert [(r["method"], r["batch"], r["classes"], r["reference_from"]) for r in rows["reduce-overhead"]] == [
        ("maple", 4, 50, "eager"), ("maple", 2, 5, "eager")]
    assert [(r["batch"], r["classes"], r["target"]) for r in rows["default"]] == [(2, 5, True), (4, 50, False)]
    checks = [r for r in records if r["record"] == "loss_check"]
    assert [c["classes"] for c in checks] == [50, 5]
    assert all(c["ours_fast"] == pytest.approx(c["maple_reference"], abs=1e-5) for c in checks)

    assert read_jsonl(out / "tests.jsonl") == [{"record": "session", "selected": 0}, {"record": "end", "exitstatus": 5}]
    data = json.loads((out / "data_throughput.json").read_text())
    assert data["images"] >= 12 and data["eval_img_s_per_worker"] > 0 and data["train_aug_img_s_per_worker"] > 0

    for heading in ("## Sub-runs", "## CUDA tests", "## Training step", "## Data reader"):
        assert heading in summary
    assert "No test ran: every gpu test was deselected" in summary
    assert summary.count("| eager | maple_reference_fp16 |") == 2 and summary.count("(equal)") == 2
    assert summary.count("| reduce-overhead | ours_maple_fp16_reduce-overhead |") == 2
    assert "batch 32 / 500 classes: not measured (target >= 3x)" in summary


def test_gpu_check_takes_the_smoke_flag_on_either_side_and_refuses_the_rest(tmp_path):
    # A Python that does not run stops the script right after the arguments are taken.
    for args in (["--cpu-smoke", str(tmp_path / "a")], [str(tmp_path / "b"), "--cpu-smoke"], [str(tmp_path / "c")]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=_env(PYTHON="/nonexistent/python"),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "/nonexistent/python does not run" in proc.stdout, (args, proc.stdout, proc.stderr)
    for args in ([], ["--cpu-smoke"], ["a", "b"], ["a", "--gpu"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "usage: bash scripts/gpu_check.sh [--cpu-smoke] OUT_DIR" in proc.stderr, args


@pytest.mark.slow
def test_a_killed_train_step_run_keeps_its_rows_and_leaves_no_other_file(tmp_path):
    """SIGKILL after the first row: the JSONL holds whole records only, no temporary file appears, and the
    summary reports the run as stopped with the rows it finished."""
    from benchmarks.gpu_summary import read_jsonl, summarise

    out = tmp_path / "out"
    out.mkdir()
    jsonl = out / "train_step.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--tiny", "--device", "cpu",
                             "--shapes", "4x50", "2x5", "3x7", "--steps", "1", "--warmup", "1", "--no-loss-check",
                             "--precision", "fp16", "--reference-precision", "fp16", "--jsonl", str(jsonl)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(r["record"] == "row" for r in read_jsonl(jsonl)):
            assert proc.poll() is None and time.monotonic() < deadline, "the benchmark ended before its first row"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in out.iterdir()] == ["train_step.jsonl"]
    with jsonl.open("a") as f:
        f.write('{"record": "row", "kind": "ours", "batch"')  # a torn last line
    records = read_jsonl(jsonl)
    assert records[0]["record"] == "run" and not any(r["record"] == "end" for r in records)
    done = [r for r in records if r["record"] == "row"]
    assert done and done[0]["kind"] == "reference" and done[0]["formulation"] == "maple_reference_fp16"
    summary = summarise(out)
    assert f"| eager | (stopped after {len(done)} rows: time limit or crash) |" in summary
    assert "| eager | maple_reference_fp16 | 4 | 50 |" in summary


def test_test_outcomes_are_recorded_as_they_happen(tmp_path):
    from benchmarks.gpu_summary import _tests_section, read_jsonl

    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('no device')\n\n"
        "def test_ok():\n    pass\n\n"
        "def test_bad():\n    assert 1 == 2, 'numbers differ'\n\n"
        "def test_setup_error(broken):\n    pass\n")
    results = tmp_path / "tests.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.gpu.results_plugin",
                           str(tmp_path / "test_sample.py")], cwd=ROOT, env=_env(HISF_GPU_TESTS_JSONL=str(results)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    records = read_jsonl(results)
    assert records[0] == {"record": "session", "selected": 3} and records[-1] == {"record": "end", "exitstatus": 1}
    tests = {r["test"].split("::")[-1]: r for r in records if r["record"] == "test"}
    assert {k: (v["outcome"], v["when"]) for k, v in tests.items()} == {
        "test_ok": ("passed", "call"), "test_bad": ("failed", "call"), "test_setup_error": ("error", "setup")}
    assert "numbers differ" in tests["test_bad"]["message"] and "no device" in tests["test_setup_error"]["message"]
    lines = _tests_section(records)
    assert lines[0] == "1 passed, 1 failed, 1 error, 0 skipped of 3 selected."
    assert any(line.startswith("- FAILED ") and "test_bad (call, " in line and "numbers differ" in line for line in lines)
    # Cut short (no end record): the summary says how far it got.
    assert "stopped after 3 (time limit)" in _tests_section(records[:-1])[0]

    # A module that does not import is an error of its own, named in the summary.
    (tmp_path / "test_sample.py").write_text("import not_a_module_on_the_gpu_image\n")
    results.unlink()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.gpu.results_plugin",
                    str(tmp_path / "test_sample.py")], cwd=ROOT, env=_env(HISF_GPU_TESTS_JSONL=str(results)),
                   capture_output=True, text=True, timeout=120)
    records = read_jsonl(results)
    broken = [r for r in records if r["record"] == "test"]
    assert [(r["when"], r["outcome"]) for r in broken] == [("collect", "error")]
    assert "not_a_module_on_the_gpu_image" in broken[0]["message"]
    assert any("ERROR" in line and "not_a_module_on_the_gpu_image" in line for line in _tests_section(records))
