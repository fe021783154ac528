"""The shipped experiment specs: valid for the orchestrator, shaped as the paper's tables, dry-run listed."""

from __future__ import annotations

import io
import re

import pytest

from orchestrator.report import load_plan
from orchestrator.report.plan import PAPER_DATASETS
from orchestrator.report.reference import reference_cells
from tests.support import ROOT

# spec -> (report shape, rows, trials `run` lists: searches × n_trials + seeded runs)
SPECS = {
    "base2new": ("base2new", ("CLIP", "CoOp", "MaPLe", "HISF", "HiCroPL"), 11 * 20 + 5 * 11 * 3),
    "cross_dataset": ("cross_dataset", ("CLIP", "CoOp", "MaPLe", "HISF", "HiCroPL"), 12 + 5 * 3),
    "domain_generalization": ("domain_generalization", ("CLIP", "CoOp", "MaPLe", "HISF", "HiCroPL"), 12 + 5 * 3),
    "hicropl_mapping": ("base2new", ("HiCroPL learned", "HiCroPL released", "HiCroPL released shared"), 3 * 11 * 3),
    "ablation_modules": ("ablation_modules", ("MaPLe setting", "w/o PI", "w/o SF", "PI+SF"), 4 * 11 * 3),
    "ablation_losses": ("ablation_losses", ("Full", "w/o L_cls", "w/o L_le", "w/o L_sa"), 4 * 11 * 3),
    "ablation_depth": ("ablation_depth", ("HISF",), 12 * 11 * 3),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_plans_and_dry_run(name, tmp_path):
    from orchestrator.context import Options
    from orchestrator.spec import load_spec
    from orchestrator.status import print_dry_run

    shape, rows, n_trials = SPECS[name]
    path = ROOT / "experiments" / f"{name}.yaml"
    plan = load_plan(path)
    assert plan.name == name and plan.shape == shape and plan.rows == rows
    assert plan.seeds == (1, 2, 3)
    if plan.protocol == "base2new":
        assert plan.datasets == PAPER_DATASETS  # Table 1's 11 datasets
    else:
        assert plan.datasets == ("imagenet",)
        # every paper target has a reference number, so the target average is comparable too
        refs = reference_cells(shape, "imagenet", plan.targets)["HISF"]
        assert {f"target/{t}" for t in plan.targets} | {"target_average"} <= {c for _, c in refs}
    out = io.StringIO()
    opts = Options(workdir=str(tmp_path), dry_run=True, out=out).resolved()
    assert print_dry_run("run", load_spec(path), opts) == 0
    text = out.getvalue()
    total = re.search(r"total: (\d+) trials, estimated ([\d.]+) device-hours, ([\d.]+) GPU-hours \(fused as planned; "
                      r"([\d.]+) GPU-hours with every trial alone", text)
    assert total and int(total.group(1)) == n_trials, text[-2000:]
    # ViT-B/16 at the paper's schedule: GPU hours, not seconds; the shipped specs fuse (fuse: auto), for less.
    assert 0.1 < float(total.group(3)) < float(total.group(4))
    listed = [l for l in text.splitlines() if re.match(r"(final|sweep) ", l)]
    assert len(listed) == len(plan.variants) * len(plan.datasets) * 3


def test_depth_spec_variants_cover_depth_1_to_12():
    plan = load_plan(ROOT / "experiments" / "ablation_depth.yaml")
    assert plan.grid_keys == ("method.depth",)
    assert [v.label for v in plan.variants] == [f"HISF depth={d}" for d in range(1, 13)]
