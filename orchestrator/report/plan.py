"""What a report expects from a spec: its shape, rows, grid variants, datasets, seeds and metrics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SHAPES = ("base2new", "cross_dataset", "domain_generalization", "ablation_modules", "ablation_losses", "ablation_depth")
BASE2NEW_METRICS = ("base_acc", "novel_acc", "hm")
# The 11 datasets of Table 1 (protocols.md); a base-to-novel average over other sets is labelled as such.
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

    @property
    def metrics(self) -> tuple[str, ...]:
        """Final metrics per (variant, dataset) cell, in the tracking layout's names."""
        if self.protocol == "base2new":
            return BASE2NEW_METRICS
        if self.protocol in ("cross_dataset", "domain_generalization"):
            return ("acc",) + tuple(f"target/{t}" for t in self.targets)
        return ("acc",)


def load_plan(path: str | Path) -> ReportPlan:
    """Read a spec file into a ReportPlan, validating it with the orchestrator's own spec loader first."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: spec file not found")
    from orchestrator.spec import load_spec

    load_spec(path)  # the full validation (key paths, values) is the spec loader's job, done once there
    with path.open() as f:
        raw = yaml.safe_load(f)
    try:
        return plan_from_dict(raw)
    except ReportError as e:
        raise ReportError(f"{path}: {e}") from None


def plan_from_dict(raw: Any) -> ReportPlan:
    """Build the plan from a spec mapping (the YAML shape of docs/interfaces.md)."""
    if not isinstance(raw, dict):
        raise ReportError(f"expected a mapping at the top level, got {type(raw).__name__}")
    name = _get(raw, "name", str)
    protocol = _get(raw, "protocol", str)
    shape = raw.get("report", protocol if protocol in SHAPES else None)
    if shape not in SHAPES:
        raise ReportError(f"report: unknown report shape {shape!r}; expected one of {list(SHAPES)}")
    data = _get(raw, "data", dict)
    datasets = tuple(_get(data, "datasets", list, "data"))
    if not datasets:
        raise ReportError("data.datasets: expected at least one dataset")
    targets = tuple(data.get("targets") or ())
    if protocol in ("cross_dataset", "domain_generalization") and not targets:
        raise ReportError(f"data.targets: protocol {protocol!r} needs target datasets")
    rows_raw = _get(raw, "rows", list)
    rows, search_rows = [], []
    for i, r in enumerate(rows_raw):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise ReportError(f"rows[{i}].name: expected a row name, got {r!r}")
        if r["name"] in rows:
            raise ReportError(f"rows[{i}].name: duplicated row name {r['name']!r}")
        rows.append(r["name"])
        if r.get("search"):
            search_rows.append(r["name"])
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise ReportError(f"grid: expected a mapping of dotted keys to lists, got {grid!r}")
    grid_keys = tuple(k for k, v in grid.items() if k != "seed" and isinstance(v, list) and len(v) > 1)
    combos = list(itertools.product(*[[_logged(v) for v in grid[k]] for k in grid_keys]))
    variants = tuple(Variant(row, tuple(zip(grid_keys, combo))) for row in rows for combo in combos)
    seeds = _seeds(raw, grid)
    search = raw.get("search") or {}
    if not isinstance(search, dict):
        raise ReportError(f"search: expected a mapping, got {search!r}")
    search_params = tuple((search.get("params") or {}).keys())
    return ReportPlan(
        name=name,
        shape=shape,
        protocol=protocol,
        datasets=datasets,
        targets=targets,
        rows=tuple(rows),
        search_rows=tuple(search_rows),
        variants=variants,
        grid_keys=grid_keys,
        seeds=seeds,
        search_params=search_params,
        search_metric=str(search.get("metric", "val_acc")),
    )


def _seeds(raw: dict, grid: dict) -> tuple[int, ...]:
    # Tables hold the final stage's seeded runs (protocols.md: "only those runs enter the tables");
    # a spec without a final stage takes its seeds from the grid, else the trial's single seed.
    final = raw.get("final") or {}
    if isinstance(final, dict) and final.get("seeds"):
        seeds = final["seeds"]
        where = "final.seeds"
    elif "seed" in grid:
        seeds, where = grid["seed"], "grid.seed"
    else:
        seeds, where = [(raw.get("base") or {}).get("seed", 1)], "base.seed"
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ReportError(f"{where}: expected a list of integer seeds, got {seeds!r}")
    return tuple(seeds)


def _logged(value: Any) -> str:
    # MLflow stores params as str(value); the grid's YAML values are compared in that form.
    return str(value)


def _get(d: dict, key: str, tp: type, prefix: str = "") -> Any:
    where = f"{prefix}.{key}" if prefix else key
    if key not in d:
        raise ReportError(f"{where}: missing")
    if not isinstance(d[key], tp):
        raise ReportError(f"{where}: expected a {tp.__name__}, got {d[key]!r}")
    return d[key]
