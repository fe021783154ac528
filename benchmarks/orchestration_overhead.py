"""Orchestration overhead per trial on the demo sweep: `hisf-bench sweep` on Ray + MLflow vs the engine alone.

Runs the demo spec's sweep (rows × final seeds) one trial at a time (so wall times add up), then the same
trial configs with `hisf.engine.run_trial` in one plain process, and prints both. Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/orchestration_overhead.py [--concurrency 1] [--epochs 2]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="hisf-bench-overhead-"))
    raw = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    raw["data"]["root"] = str(wd / "data")
    raw["base"]["train"]["epochs"] = args.epochs
    raw["resources"]["max_concurrent_trials"] = args.concurrency
    raw.pop("search")
    for row in raw["rows"]:
        row.pop("search", None)
        if "descriptions" in row.get("method", {}):
            # The demo's descriptions are written beside its data (HiCroPL's row reads them).
            row["method"]["descriptions"] = str(wd / "data" / "descriptions")
    spec_path = wd / "demo-sweep.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))

    from orchestrator.runner import Options, prepare_data, run_sweep
    from orchestrator.spec import load_spec
    from orchestrator.tracking import Tracker
    from orchestrator.trials import expand_sweep, trials_root

    spec = load_spec(spec_path)
    prepare_data(spec, io.StringIO())
    opts = Options(workdir=str(wd / "hisf-bench"), out=io.StringIO()).resolved()
    t0 = time.perf_counter()
    result = run_sweep(spec, opts)
    sweep_wall = time.perf_counter() - t0
    tracker = Tracker(opts.tracking_uri, spec.name)
    runs = tracker.children(result.parent_run_id)
    engine_in_ray = [r.data.metrics["engine_seconds"] for r in runs]
    in_trial = [r.data.metrics["orchestration_seconds"] for r in runs]

    # The same trial configs with the engine alone, in one process, one after another.
    from hisf.config import replace_path
    from hisf.deletion import remove_tree
    from hisf.engine import run_trial

    trials = expand_sweep(spec, wd / "direct")
    direct = []
    for t in trials:
        remove_tree(t.config.output_dir, trials_root(wd / "direct", spec), "trial folder")
        s = time.perf_counter()
        run_trial(replace_path(t.config, "output_dir", t.config.output_dir))
        direct.append(time.perf_counter() - s)

    n = len(trials)
    total_direct = sum(direct)
    per_trial_overhead = (sweep_wall * args.concurrency - total_direct) / n
    report = {
        "trials": n, "concurrency": args.concurrency, "epochs": args.epochs,
        "sweep_wall_s": round(sweep_wall, 2),
        "engine_alone_total_s": round(total_direct, 2),
        "engine_alone_median_s": round(statistics.median(direct), 3),
        "engine_inside_ray_median_s": round(statistics.median(engine_in_ray), 3),
        "in_trial_overhead_median_s (tracking+tune report+ckpt)": round(statistics.median(in_trial), 3),
        "in_trial_overhead_max_s": round(max(in_trial), 3),
        "end_to_end_overhead_per_trial_s (incl. Ray start, scheduling)": round(per_trial_overhead, 3),
        "in_trial_overhead_pct_of_engine_median": round(100 * statistics.median(
            o / e for o, e in zip(in_trial, engine_in_ray)), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
