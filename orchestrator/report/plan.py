"""What a report expects from a spec: its shape, rows, grid variants, datasets, seeds and metrics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = ("base2new", "cross_dataset", "domain_generalization", "ablation_modules", "ablation_losses", "ablation_depth")
BASE2NEW_METRICS = ("base_acc", "novel_acc", "hm")
# The 11 datasets of Table 1 (docs/protocols.md); a base-to-novel average over other sets is labelled as such.
PAPER_DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)


class ReportError(ValueError):
    """The spec, the tracking store or the study storage cannot give a report; the message says why."""


@dataclass(frozen=True)
class Variant:
    """One table row: a spec row plus one combination of the grid's non-seed values."""

    row: str
    values: tuple[tuple[str, str], ...]  # ((dotted key, value as MLflow logs it), ...)

    @property
    def label(self) -> str:
        extra = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.values)
        return f"{self.row} {extra}" if extra else self.row


@dataclass(frozen=True)
class ReportPlan:
    name: str
    shape: str
    protocol: str
    datasets: tuple[str, ...]
    targets: tuple[str, ...]
    rows: tuple[str, ...]
    search_rows: tuple[str, ...]
    variants: tuple[Variant, ...]
    grid_keys: tuple[str, ...]  # non-seed grid keys whose values tell the variants apart
    seeds: tuple[int, ...]
    search_params: tuple[str, ...]
    search_metric: str = "val_acc"
    spec_hash: str = ""
    shots: int = 16
    backbones: tuple[tuple[str, str | None], ...] = ()  # every row's (backbone name, weights)

    def unlike_the_paper(self) -> str:
        """Why this spec's numbers are not comparable to the published ones, or "" when they are: the papers
        report ViT-B/16 with its pretrained weights, 16 shots, and (base-to-novel) the average over the 11
        datasets of Table 1, (transfer) prompts trained on ImageNet (docs/protocols.md)."""
        why = []
        if self.protocol == "base2new" and set(self.datasets) != set(PAPER_DATASETS):
            others = sorted(set(self.datasets) - set(PAPER_DATASETS))
            why.append(f"its average is over {len(self.datasets)} dataset(s)"
                       + (f" ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''} not among them)" if others else "")
                       + ", the paper's over the 11 of Table 1")
        if self.protocol in ("cross_dataset", "domain_generalization") and tuple(self.datasets) != ("imagenet",):
            why.append(f"its prompts are trained on {', '.join(self.datasets)}, the paper's on imagenet")
        if self.shots != 16:
            why.append(f"it trains with {self.shots} shots, the paper with 16")
        other = sorted({f"{n} ({w or 'random weights'})" for n, w in self.backbones if n != "ViT-B-16" or not w})
        if other:
            why.append(f"its backbone is {', '.join(other)}, the paper's ViT-B-16 with its pretrained weights")
        return "; ".join(why)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Final metrics per (variant, dataset) cell, in the tracking layout's names."""
        if self.protocol == "base2new":
            return BASE2NEW_METRICS
        if self.protocol in ("cross_dataset", "domain_generalization"):
            return ("acc",) + tuple(f"target/{t}" for t in self.targets)
        return ("acc",)


def load_plan(path: str | Path) -> ReportPlan:
    """Read and validate a spec file with the orchestrator's own loader, then derive the report plan."""
    from orchestrator.spec import load_spec

    return plan_from_spec(load_spec(path))


def plan_from_dict(raw: Any) -> ReportPlan:
    """A plan from a spec mapping (the YAML shape of docs/interfaces.md), validated by the spec parser."""
    from orchestrator.spec import parse_spec

    return plan_from_spec(parse_spec(raw))


def plan_from_spec(spec: Any) -> ReportPlan:
    """What the tables expect from a validated `orchestrator.spec.ExperimentSpec`."""
    from hisf.config import TrialConfig, replace_path

    from orchestrator.tracking import param_str

    if spec.report not in SHAPES:
        raise ReportError(f"report: unknown report shape {spec.report!r}; expected one of {list(SHAPES)}")
    grid = dict(spec.grid)
    # Only grid keys with several values tell rows apart; the seed axis is the one tables average over.
    grid_keys = tuple(k for k, v in spec.grid if k != "seed" and len(v) > 1)
    variants, backbones = [], []
    for row in spec.rows:
        cfg = TrialConfig.from_dict(spec.trial_dict(row, spec.data.datasets[0]))
        backbones.append((cfg.backbone.name, cfg.backbone.pretrained))
        # Compare against params as the tracker logs them: the value coerced by the config (1 -> "1.0"
        # for a float key), then written by the tracker's own formatter.
        logged = [[param_str(replace_path(cfg, k, v).flatten()[k]) for v in grid[k]] for k in grid_keys]
        for combo in itertools.product(*logged):
            variants.append(Variant(row.name, tuple(zip(grid_keys, combo))))
    if spec.final is not None:
        seeds = tuple(spec.final.seeds)
    elif "seed" in grid:
        seeds = tuple(grid["seed"])
    else:
        seeds = (int(spec.base.get("seed", 1)),)
    search = spec.search
    return ReportPlan(
        name=spec.name,
        shape=spec.report,
        protocol=spec.protocol,
        datasets=tuple(spec.data.datasets),
        targets=tuple(spec.data.targets),
        rows=tuple(r.name for r in spec.rows),
        search_rows=tuple(r.name for r in spec.rows if r.search),
        variants=tuple(variants),
        grid_keys=grid_keys,
        seeds=seeds,
        search_params=tuple(p.key for p in search.params) if search else (),
        search_metric=search.metric if search else "val_acc",
        spec_hash=spec.hash,
        shots=spec.data.shots,
        backbones=tuple(dict.fromkeys(backbones)),
    )
