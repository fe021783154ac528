"""Writes OUT_DIR/summary.md from what scripts/gpu_check.sh left in OUT_DIR: the sub-runs' exit codes and
times (steps.tsv), the CUDA tests' JUnit XML, the train-step rows per compile mode and the data reader's rates.

    python benchmarks/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Our maple step against MaPLe's formulation (issue: "≥ 10x at batch 4 / 50 classes, ≥ 3x at batch 32 / 500").
TARGETS = {(4, 50): 10.0, (32, 500): 3.0}
MODES = ("eager", "default", "reduce-overhead")
# First-step losses of our fp32 maple and MaPLe's reference on the same batch agree to this (fp32 reordering).
LOSS_TOL = 1e-3


def _steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, limit = line.split("\t")
        rows.append({"name": name, "rc": int(rc), "seconds": float(seconds), "limit": int(limit)})
    return rows


def _pytest(out: Path) -> dict:
    path = out / "pytest.xml"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if path.is_file():
        root = ET.parse(path).getroot()
        for suite in root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {**counts, "failed": failed, "present": path.is_file()}


def _bench(out: Path) -> list[dict]:
    reports = []
    for mode in MODES:
        path = out / f"train_step_{mode}.json"
        if path.is_file():
            reports.append(json.loads(path.read_text()))
    return reports


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def summarise(out: Path) -> str:
    steps, tests, reports = _steps(out), _pytest(out), _bench(out)
    lines = ["# GPU check", ""]
    device = next((r["device"] for r in reports), "unknown")
    torch_version = next((r["torch"] for r in reports), "unknown")
    lines += [f"Device: **{device}**, torch {torch_version}.", ""]

    lines += ["## Sub-runs", "", "| step | exit | seconds | limit |", "|---|---|---|---|"]
    for s in steps:
        status = "timed out" if s["rc"] in (124, 137) else ("ok" if s["rc"] == 0 else f"exit {s['rc']}")
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.0f} | {s['limit']} |")

    lines += ["", "## CUDA tests (`pytest -m gpu tests/gpu`)", ""]
    if not tests["present"]:
        lines.append("No JUnit report: pytest did not finish (see the sub-runs and gpu_check.log).")
    elif tests["tests"] == 0:
        lines.append("No test ran: every gpu test was deselected (no CUDA device visible).")
    else:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines.append(f"{passed} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                     f"of {tests['tests']}.")
        lines += [f"- FAILED {name}" for name in tests["failed"]]

    lines += ["", "## Training step: ours against MaPLe's formulation", ""]
    for r in reports:
        for c in r.get("loss_checks", []):
            ok = abs(c["ours_fast"] - c["maple_reference"]) <= LOSS_TOL * max(1.0, abs(c["maple_reference"]))
            lines.append(f"- fp32 first-step loss, batch {c['batch']}, {c['classes']} classes: ours {c['ours_fast']:.6f}, "
                         f"ours full-length {c['ours_eager_77']:.6f}, MaPLe reference {c['maple_reference']:.6f} "
                         f"({'equal' if ok else 'DIFFERENT'})")
    lines += ["", "| mode | formulation | batch | classes | ms/step | img/s | peak MiB | x reference | first loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    best: dict[tuple[int, int], tuple[float, str]] = {}
    for r in reports:
        if not r.get("complete"):
            lines.append(f"| {r['mode']} | (stopped after {len(r['rows'])} rows) | | | | | | | |")
        for row in r["rows"]:
            lines.append(f"| {row['mode']} | {row['formulation']} | {row['batch']} | {row['classes']} | "
                         f"{_fmt(row['ms_per_step'])} | {_fmt(row['images_per_s'], 1)} | {_fmt(row['peak_mib'], 0)} | "
                         f"{_fmt(row.get('speedup_vs_reference'))} | {_fmt(row['first_loss'], 4)} |")
            sp = row.get("speedup_vs_reference")
            if row["kind"] == "ours" and row["method"] == "maple" and sp is not None:
                key = (row["batch"], row["classes"])
                if key not in best or sp > best[key][0]:
                    best[key] = (sp, row["mode"])

    lines += ["", "Targets (our maple, best mode, against MaPLe's fp16 formulation):", ""]
    for (batch, classes), target in TARGETS.items():
        if (batch, classes) in best:
            sp, mode = best[(batch, classes)]
            verdict = "met" if sp >= target else "NOT met"
            lines.append(f"- batch {batch} / {classes} classes: {sp:.2f}x ({mode}), target >= {target:g}x: {verdict}")
        else:
            lines.append(f"- batch {batch} / {classes} classes: not measured (target >= {target:g}x)")

    lines += ["", "## Data reader (`benchmarks/data_throughput.py`)", ""]
    path = out / "data_throughput.json"
    if path.is_file():
        data = json.loads(path.read_text())
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in data.items() if k != "bench"]
    else:
        lines.append("Not measured (the sub-run failed or timed out).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    text = summarise(out)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
