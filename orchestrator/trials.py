"""Expanding a validated spec into trials: one frozen TrialConfig per (stage, row, dataset, grid point, seed)."""

from __future__ import annotations

import dataclasses

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from hisf.config import TrialConfig, replace_path

from orchestrator.spec import ExperimentSpec, RowSpec, SpecError, id_part

STAGES = ("sweep", "search", "final")


@dataclass(frozen=True)
class Trial:
    """One unit of work for Ray Tune; `trial_id` is stable across reruns so `--resume` can find it."""

    trial_id: str
    stage: str
    row: str
    dataset: str
    seed: int
    # The grid point and (search stage) the sampled values, as dotted keys.
    point: tuple[tuple[str, Any], ...]
    config: TrialConfig
    study: str | None = None
    optuna_number: int | None = None
    optuna_trial_id: int | None = None

    def payload(self) -> dict[str, Any]:
        """A plain dict that travels to a Ray worker."""
        return {
            "trial_id": self.trial_id, "stage": self.stage, "row": self.row, "dataset": self.dataset,
            "seed": self.seed, "point": [list(p) for p in self.point], "config": self.config.to_dict(),
            "study": self.study, "optuna_number": self.optuna_number, "optuna_trial_id": self.optuna_trial_id,
        }

    @property
    def run_name(self) -> str:
        """What a row of the MLflow runs table says: `HISF · oxford_pets · seed 1 · depth=9` (search trials
        add their number and sampled values, final trials of searched rows the best values they took)."""
        parts = [self.row, self.dataset, f"seed {self.seed}"]
        if self.optuna_number is not None:
            parts.append(f"trial {self.optuna_number}")
        if self.point:
            parts.append(", ".join(f"{k.rsplit('.', 1)[-1]}={_label(v)}" for k, v in self.point))
        return " · ".join(parts)

    @classmethod
    def from_payload(cls, d: Mapping[str, Any]) -> "Trial":
        return cls(
            trial_id=d["trial_id"], stage=d["stage"], row=d["row"], dataset=d["dataset"], seed=d["seed"],
            point=tuple((k, v) for k, v in d["point"]), config=TrialConfig.from_dict(d["config"]),
            study=d.get("study"), optuna_number=d.get("optuna_number"), optuna_trial_id=d.get("optuna_trial_id"),
        )


@dataclass(frozen=True)
class SearchGroup:
    """One Optuna study: a searched row on one dataset at one grid point, with the search seed."""

    row: str
    dataset: str
    point: tuple[tuple[str, Any], ...]
    study: str
    config: TrialConfig


def grid_points(spec: ExperimentSpec) -> list[tuple[tuple[str, Any], ...]]:
    keys = [k for k, _ in spec.grid]
    return [tuple(zip(keys, values)) for values in itertools.product(*(v for _, v in spec.grid))] or [()]


def _cells(spec: ExperimentSpec, rows) -> Iterator[tuple[RowSpec, str, tuple[tuple[str, Any], ...]]]:
    """(row, dataset, grid point without its `seed` axis) for rows × datasets × grid: the search and final
    stages choose their seeds themselves."""
    for row in rows:
        for dataset in spec.data.datasets:
            for point in grid_points(spec):
                yield row, dataset, tuple(p for p in point if p[0] != "seed")


def trial_id(stage: str, row: str, dataset: str, point, seed: int | None = None, number: int | None = None) -> str:
    parts = [stage, row, dataset]
    parts += [f"{k.rsplit('.', 1)[-1]}{_short(v)}" for k, v in point]
    if number is not None:
        parts.append(f"t{number}")
    if seed is not None:
        parts.append(f"s{seed}")
    return id_part("-".join(parts))


def trials_root(workdir: str | Path, spec: ExperimentSpec) -> Path:
    """<workdir>/runs/<spec>: the folder that holds the spec's trial folders (and the only one their deletion may touch)."""
    return Path(workdir).resolve() / "runs" / spec.name


def trial_dir(workdir: str | Path, spec: ExperimentSpec, tid: str) -> str:
    return str(trials_root(workdir, spec) / tid)


def build_config(spec: ExperimentSpec, row: RowSpec, dataset: str, point, seed: int,
                 values: Mapping[str, Any] | None, output_dir: str) -> TrialConfig:
    d = spec.trial_dict(row, dataset)
    d["seed"] = seed
    d["output_dir"] = output_dir
    # Ray workers run in their own folders: a relative data root means "relative to where the driver ran".
    d["data"]["root"] = str(Path(d["data"]["root"]).resolve())
    # Likewise a relative local checkpoint path (a pretrained tag is not a path and stays as it is).
    pretrained = (d.get("backbone") or {}).get("pretrained")
    if isinstance(pretrained, str) and not Path(pretrained).is_absolute() and Path(pretrained).exists():
        d["backbone"] = {**d["backbone"], "pretrained": str(Path(pretrained).resolve())}
    cfg = TrialConfig.from_dict(d)
    for key, v in list(point) + list((values or {}).items()):
        cfg = replace_path(cfg, key, v)
    source = getattr(cfg.method, "descriptions", "templates")
    if source != "templates" and not Path(source).expanduser().is_absolute():
        # HiCroPL's descriptions file or folder, like the data root: relative to where the driver ran.
        cfg = replace_path(cfg, "method.descriptions", str(Path(source).expanduser().resolve()))
    return cfg.validate()


def _seeds_for_sweep(spec: ExperimentSpec, cfg_seed: int) -> tuple[int, ...]:
    if any(k == "seed" for k, _ in spec.grid):
        return (None,)  # the grid point sets it
    return spec.final.seeds if spec.final else (cfg_seed,)


def expand_sweep(spec: ExperimentSpec, workdir: str | Path) -> list[Trial]:
    """rows × datasets × grid × seeds (final.seeds, or the grid's own `seed` key)."""
    out = []
    for row in spec.rows:
        for dataset in spec.data.datasets:
            base_seed = int(spec.trial_dict(row, dataset).get("seed", 1))
            for point in grid_points(spec):
                for seed in _seeds_for_sweep(spec, base_seed):
                    s = seed if seed is not None else dict(point)["seed"]
                    pt = tuple(p for p in point if p[0] != "seed")
                    tid = trial_id("sweep", row.name, dataset, pt, s)
                    cfg = build_config(spec, row, dataset, pt, s, None, trial_dir(workdir, spec, tid))
                    out.append(Trial(tid, "sweep", row.name, dataset, s, pt, cfg))
    return _unique(out)


def search_groups(spec: ExperimentSpec, tag: str = "") -> list[SearchGroup]:
    """One study per searched (row, dataset, grid point); `tag` keeps reruns in separate studies."""
    if spec.search is None:
        raise SpecError(f"{spec.path}: search: the spec has no `search:` section")
    if not spec.searched_rows:
        raise SpecError(f"{spec.path}: rows: no row has `search: true`")
    groups = []
    for row, dataset, pt in _cells(spec, spec.searched_rows):
        name = ":".join([spec.name, row.name, dataset] + [f"{k}={_short(v)}" for k, v in pt] + ([tag] if tag else []))
        cfg = build_config(spec, row, dataset, pt, spec.search.seed, None, "")
        groups.append(SearchGroup(row.name, dataset, pt, name, cfg))
    return groups


def search_trial(spec: ExperimentSpec, group: SearchGroup, number: int, optuna_trial_id: int,
                 values: Mapping[str, Any], workdir: str | Path) -> Trial:
    tid = trial_id("search", group.row, group.dataset, group.point, None, number)
    cfg = build_config(spec, spec.row(group.row), group.dataset, group.point, spec.search.seed, values,
                       trial_dir(workdir, spec, tid))
    # docs/protocols.md: the test split never feeds a search, so search trials do not even open it.
    cfg = dataclasses.replace(cfg, evaluate_test=False)
    point = group.point + tuple(sorted(values.items()))
    return Trial(tid, "search", group.row, group.dataset, spec.search.seed, point, cfg,
                 study=group.study, optuna_number=number, optuna_trial_id=optuna_trial_id)


def expand_final(spec: ExperimentSpec, workdir: str | Path, best: Mapping[tuple, Mapping[str, Any]]) -> list[Trial]:
    """rows × datasets × grid × final seeds; searched rows take their study's best values.

    `best` maps (row, dataset, point) -> {dotted key: value} for every searched group.
    """
    if spec.final is None:
        raise SpecError(f"{spec.path}: final: the spec has no `final:` section (seeds)")
    out = []
    for row, dataset, pt in _cells(spec, spec.rows):
        values = None
        if row.search:
            if (row.name, dataset, pt) not in best:
                raise SpecError(f"{spec.path}: final: no finished search study for row {row.name!r} on "
                                f"{dataset!r}; run `hisf-bench search {spec.path}` first")
            values = best[(row.name, dataset, pt)]
        for seed in spec.final.seeds:
            tid = trial_id("final", row.name, dataset, pt, seed)
            cfg = build_config(spec, row, dataset, pt, seed, values, trial_dir(workdir, spec, tid))
            out.append(Trial(tid, "final", row.name, dataset, seed, pt + tuple(sorted((values or {}).items())), cfg))
    return _unique(out)


def trial_resources(spec: ExperimentSpec) -> dict[str, float]:
    """What one Tune trial asks Ray for; a DDP trial's workers ask through Ray Train instead."""
    r = spec.resources
    if r.workers_per_trial > 1:
        # The function trial only builds and waits on its TorchTrainer; the workers hold the devices.
        # (Ray refuses an empty request, so the waiting trial holds a sliver of a CPU.)
        return {"cpu": 0.01, "gpu": 0.0}
    return {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}


_DEFAULT_CLASSES = 100


def class_count(root: str, key: str) -> int:
    """A built dataset's class count (its info.json), or 100 when it is not built yet (an estimate's guess)."""
    import json

    info = Path(root) / key / "info.json"
    if info.is_file():
        try:
            names = json.loads(info.read_text()).get("classnames")
            if names:
                return len(names)
        except (OSError, ValueError):
            pass
    return _DEFAULT_CLASSES


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "_".join(str(x) for x in v)
    return str(v)


def _label(v: Any) -> str:
    """A grid or sampled value short enough for a run name (floats to 4 significant digits)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_label(x) for x in v) + "]"
    return str(v)


def _unique(trials: list[Trial]) -> list[Trial]:
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.trial_id in seen:
            raise SpecError(f"two trials share the id {t.trial_id!r}: row names or grid values collide")
        seen[t.trial_id] = t
    return trials
