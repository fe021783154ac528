"""Writes OUT_DIR/summary.md from what scripts/gpu_check.sh left in OUT_DIR: the sub-runs' exit codes, times and
limits (steps.tsv), the CUDA tests' outcomes (tests.jsonl), the train-step rows of every mode (train_step.jsonl)
against the targets, and the data reader's rates (data_throughput.json).

    python benchmarks/gpu_summary.py OUT_DIR

Imports nothing heavy (benchmarks/train_step.py reads TARGETS from here).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Our maple step against MaPLe's formulation (issue: "≥ 10x at batch 4 / 50 classes, ≥ 3x at batch 32 / 500").
TARGETS = {(4, 50): 10.0, (32, 500): 3.0}
MODES = ("eager", "reduce-overhead", "default", "max-autotune")
# Trial fusion (issue 17): member-steps per second of K = 8 fused maple members at batch 4 / 50 classes against one
# trial's steps per second (K = 1, compiled: train_step's reduce-overhead row, else our fastest K = 1 row).
FUSION_TARGET = 5.0
# First-step losses of our fp32 maple and MaPLe's reference on the same batch agree to this (fp32 reordering).
LOSS_TOL = 1e-3


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (a sub-run killed mid-write) is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, limit = line.split("\t")
        rows.append({"name": name, "rc": int(rc), "seconds": float(seconds), "limit": int(limit)})
    return rows


def _runs(records: list[dict]) -> list[dict]:
    """train_step.jsonl grouped by sub-run (mode): its header, loss checks, rows, skipped rows, end."""
    runs: list[dict] = []
    for rec in records:
        kind = rec.get("record")
        if kind == "run":
            runs.append({**rec, "loss_checks": [], "rows": [], "skipped": [], "complete": False, "ended": False})
        elif runs:
            run = runs[-1]
            if kind == "loss_check":
                run["loss_checks"].append(rec)
            elif kind == "row":
                run["rows"].append(rec)
            elif kind == "skipped":
                run["skipped"] += rec.get("skipped", [])
                run["skip_reason"] = rec.get("skip_reason", "")
            elif kind == "end":
                run["complete"], run["ended"] = bool(rec.get("complete")), True
    return runs


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _tests_section(records: list[dict]) -> list[str]:
    session = next((r for r in records if r.get("record") == "session"), None)
    end = next((r for r in records if r.get("record") == "end"), None)
    tests = [r for r in records if r.get("record") == "test" and r["when"] != "collect"]
    broken = [f"- ERROR collecting {r['test']}: {r['message']}" for r in records
              if r.get("record") == "test" and r["when"] == "collect"]
    if session is None:
        return ["No test outcome recorded: pytest did not start (see the sub-runs and gpu_check.log).", *broken]
    if session["selected"] == 0:
        if broken:
            return [f"No test ran: {len(broken)} test module(s) failed to import.", *broken]
        return ["No test ran: every gpu test was deselected (no CUDA device visible)."]
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    lines = [", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped"))
             + f" of {session['selected']} selected"
             + ("." if end is not None else f"; stopped after {len(tests)} (time limit): the rest did not run."), *broken]
    lines += [f"- {t['outcome'].upper()} {t['test']} ({t['when']}, {t['seconds']:.0f}s): {t['message']}" for t in tests
              if t["outcome"] in ("failed", "error")]
    slow = sorted(tests, key=lambda t: -t["seconds"])[:5]
    if slow:
        lines.append("- slowest: " + ", ".join(f"{t['test'].split('::')[-1]} {t['seconds']:.0f}s" for t in slow))
    return lines


def summarise(out: Path) -> str:
    steps, runs = _steps(out), _runs(read_jsonl(out / "train_step.jsonl"))
    lines = ["# GPU check", ""]
    device = next((r["device"] for r in runs), "unknown")
    torch_version = next((r["torch"] for r in runs), "unknown")
    total = sum(s["seconds"] for s in steps)
    lines += [f"Device: **{device}**, torch {torch_version}; {total:.0f} s in all.", ""]

    lines += ["## Sub-runs", "", "| step | exit | seconds | limit |", "|---|---|---|---|"]
    for s in steps:
        status = "timed out" if s["rc"] in (124, 137) else ("ok" if s["rc"] == 0 else f"exit {s['rc']}")
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.0f} | {s['limit'] or '-'} |")

    lines += ["", "## CUDA tests (`pytest -m gpu tests/gpu`)", ""]
    lines += _tests_section(read_jsonl(out / "tests.jsonl"))

    lines += ["", "## Training step: ours against MaPLe's formulation", ""]
    for r in runs:
        for c in r["loss_checks"]:
            ok = abs(c["ours_fast"] - c["maple_reference"]) <= LOSS_TOL * max(1.0, abs(c["maple_reference"]))
            lines.append(f"- fp32 first-step loss, batch {c['batch']}, {c['classes']} classes: ours {c['ours_fast']:.6f}, "
                         f"ours full-length {c['ours_eager_77']:.6f}, MaPLe reference {c['maple_reference']:.6f} "
                         f"({'equal' if ok else 'DIFFERENT'})")
    lines += ["", "| mode | formulation | batch | classes | ms/step | img/s | peak MiB | x reference | first loss | "
              "first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    best: dict[tuple[int, int], tuple[float, str]] = {}
    for r in sorted(runs, key=lambda r: MODES.index(r["mode"]) if r["mode"] in MODES else len(MODES)):
        for row in r["rows"]:
            lines.append(f"| {row['mode']} | {row['formulation']} | {row['batch']} | {row['classes']} | "
                         f"{_fmt(row['ms_per_step'])} | {_fmt(row['images_per_s'], 1)} | {_fmt(row['peak_mib'], 0)} | "
                         f"{_fmt(row.get('speedup_vs_reference'))} | {_fmt(row['first_loss'], 4)} | "
                         f"{_fmt(row.get('first_step_s'), 1)} |")
            sp = row.get("speedup_vs_reference")
            if row["kind"] == "ours" and row["method"] == "maple" and sp is not None:
                key = (row["batch"], row["classes"])
                if key not in best or sp > best[key][0]:
                    best[key] = (sp, row["mode"])
        if r["skipped"]:
            lines.append(f"| {r['mode']} | (not timed: {', '.join(r['skipped'])}; {r.get('skip_reason', '')}) "
                         f"| | | | | | | | |")
        elif not r["ended"]:
            lines.append(f"| {r['mode']} | (stopped after {len(r['rows'])} rows: time limit or crash) | | | | | | | | |")

    lines += ["", "Targets (our maple, best mode, against MaPLe's fp16 formulation):", ""]
    for (batch, classes), target in TARGETS.items():
        if (batch, classes) in best:
            sp, mode = best[(batch, classes)]
            verdict = "met" if sp >= target else "NOT met"
            lines.append(f"- batch {batch} / {classes} classes: {sp:.2f}x ({mode}), target >= {target:g}x: {verdict}")
        else:
            lines.append(f"- batch {batch} / {classes} classes: not measured (target >= {target:g}x)")

    lines += _fusion_section(read_jsonl(out / "fusion.jsonl"), runs)

    lines += ["", "## Data reader (`benchmarks/data_throughput.py`)", ""]
    path = out / "data_throughput.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        data = None
    if data:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in data.items() if k != "bench"]
    else:
        lines.append("Not measured (the sub-run failed or timed out).")
    return "\n".join(lines) + "\n"


def _fusion_section(records: list[dict], step_runs: list[dict]) -> list[str]:
    """Trial fusion's rows (benchmarks/fusion.py) and the target: K = 8 fused maple against one compiled trial."""
    rows = [r for r in records if r.get("record") == "row"]
    lines = ["", "## Trial fusion (`benchmarks/fusion.py`)", ""]
    if not rows:
        return lines + ["Not measured (the sub-runs failed or timed out)."]
    lines += ["| mode | method | batch | classes | K | fused ms | sequential ms | fused member-steps/s | "
              "sequential member-steps/s | x sequential | peak MiB | first-step loss diff |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['compile']} | {r['method']} | {r['batch']} | {r['classes']} | {r['k']} | {_fmt(r['fused_ms'])} | "
                     f"{_fmt(r['sequential_ms'])} | {_fmt(r['fused_member_steps_per_s'], 1)} | "
                     f"{_fmt(r['sequential_member_steps_per_s'], 1)} | {_fmt(r['speedup'])} | {_fmt(r['peak_mib'], 0)} "
                     f"({r['peak_kind']}) | {r['loss_diff']:.1e} |")
    # One trial alone, compiled where it was: steps per second of our maple at 4 x 50.
    singles = [1000.0 / row["ms_per_step"] for run in step_runs for row in run["rows"]
               if row.get("kind") == "ours" and row.get("method") == "maple" and (row["batch"], row["classes"]) == (4, 50)
               and row.get("ms_per_step")]
    singles += [r["fused_member_steps_per_s"] for r in rows if r["method"] == "maple" and r["k"] == 1
                and (r["batch"], r["classes"]) == (4, 50)]
    fused = [r["fused_member_steps_per_s"] for r in rows if r["method"] == "maple" and r["k"] == 8
             and (r["batch"], r["classes"]) == (4, 50)]
    if singles and fused:
        ratio = max(fused) / max(singles)
        lines += ["", f"Target: K = 8 fused maple at batch 4 / 50 classes, {max(fused):.1f} member-steps/s, against one "
                      f"trial's best {max(singles):.1f} steps/s: {ratio:.2f}x, target >= {FUSION_TARGET:g}x: "
                      f"{'met' if ratio >= FUSION_TARGET else 'NOT met'}"]
    else:
        lines += ["", f"Target (K = 8 against one compiled trial, >= {FUSION_TARGET:g}x): not measured."]
    return lines


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
