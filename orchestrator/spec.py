"""The experiment spec: an `experiments/*.yaml` file validated into frozen dataclasses before Ray starts.

Every error names the key path in the spec (`search.params.method.lambda_le.low`) and what was expected,
so a typo fails in milliseconds instead of after a cluster has been scheduled.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hisf.config import PROTOCOLS, ConfigError, TrialConfig, check_seed, coerce
from orchestrator.spec_checks import ParamRange, check_trial_configs  # noqa: F401 - ParamRange is part of the spec

REPORTS = ("base2new", "cross_dataset", "domain_generalization", "ablation_modules", "ablation_losses", "ablation_depth")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# What a search trial reports that a study can maximise (hisf/engine/trial.py: every epoch train/<term>, lr,
# epoch, skipped_steps and val_acc; a search trial never evaluates the test split, docs/protocols.md).
SEARCH_METRICS = ("val_acc",)
# The spec name and the dataset keys are folders (runs/<name>/, reports/<name>/, data.root/<key>/), log file
# prefixes, MLflow names and parts of ':'-separated Optuna study names: one plain path component, never `.`,
# `..` or `a/b`. (Catalogue keys and the names `data build` gives custom builds are all of this form.)
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Keys a spec may not set per trial: the orchestrator owns them (one output folder per trial id,
# the protocol and data from the spec's own sections).
_RESERVED = ("protocol", "output_dir", "data")


class SpecError(ConfigError):
    """The experiment spec is invalid; the message names the file and the key path."""


@dataclass(frozen=True)
class DataSpec:
    root: str = "data"
    datasets: tuple[str, ...] = ()
    shots: int = 16
    targets: tuple[str, ...] = ()
    # Build the demo dataset(s) under `root` before running (`hisf-bench data demo` + `data build`).
    demo: bool = False
    num_workers: int = 0


@dataclass(frozen=True)
class RowSpec:
    """One table row: a label plus TrialConfig section overrides (method switches, train, backbone)."""

    name: str
    overrides: Mapping[str, Any]
    search: bool = False


@dataclass(frozen=True)
class SearchSpec:
    sampler: str = "tpe"
    n_trials: int = 20
    seed: int = 1
    metric: str = "val_acc"
    pruner: str = "median"
    params: tuple[ParamRange, ...] = ()
    # Random trials before TPE starts modelling (Optuna's n_startup_trials).
    startup_trials: int = 5


@dataclass(frozen=True)
class FinalSpec:
    seeds: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class ResourcesSpec:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    max_concurrent_trials: int = 2
    max_failures: int = 2
    # false: a finished trial's training checkpoints are deleted once it is on record (orchestrator/resume.py)
    keep_checkpoints: bool = False
    # Trial fusion (docs/fusion.md): up to `fuse` compatible trials train as one group in one Tune trial; "auto"
    # sizes groups to the device's memory (gpu_memory_gib per GPU) and up to 8 members on a CPU.
    fuse: int | str = 1
    gpu_memory_gib: float = 80.0


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    protocol: str
    report: str
    data: DataSpec
    base: Mapping[str, Any]
    rows: tuple[RowSpec, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    search: SearchSpec | None = None
    final: FinalSpec | None = None
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    path: str = ""
    # sha256 of the spec's canonical JSON (first 12 hex): tags every run so a report can tell edits apart.
    hash: str = ""

    @property
    def searched_rows(self) -> tuple[RowSpec, ...]:
        return tuple(r for r in self.rows if r.search)

    def row(self, name: str) -> RowSpec:
        for r in self.rows:
            if r.name == name:
                return r
        raise SpecError(f"rows: no row named {name!r}; rows are {[r.name for r in self.rows]}")

    def trial_dict(self, row: RowSpec, dataset: str) -> dict[str, Any]:
        """The plain config dict of one (row, dataset) before grid values, seeds and searched values."""
        d = _deep_merge(copy.deepcopy(dict(self.base)), row.overrides)
        d["protocol"] = self.protocol
        d["data"] = {
            "root": self.data.root,
            "dataset": dataset,
            "shots": self.data.shots,
            "targets": list(self.data.targets),
            "num_workers": self.data.num_workers,
        }
        return d


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a spec file; raises SpecError naming the file and key path."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: experiment spec not found")
    import yaml

    from hisf.yaml_io import load_yaml, yaml_error

    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {yaml_error(e)}") from None
    try:
        return parse_spec(raw, path=str(path))
    except ConfigError as e:
        raise SpecError(f"{path}: {e}") from None


def parse_spec(raw: Any, path: str = "") -> ExperimentSpec:
    """Validate a plain dict (a parsed spec) into an ExperimentSpec."""
    m = _mapping(raw, "spec")
    _keys(m, "", required=("name", "protocol", "data", "rows"),
          optional=("report", "base", "grid", "search", "final", "resources"))
    name = _str(m["name"], "name")
    if not PLAIN_NAME.fullmatch(name):
        raise SpecError(f"name: {name!r} is not a plain name; expected 1-128 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit (it names the trial folders runs/<name>/, the logs, the "
                        "MLflow experiment and the Optuna studies)")
    protocol = _choice(m["protocol"], PROTOCOLS, "protocol")
    report = _choice(m.get("report", "base2new" if protocol == "base2new" else protocol), REPORTS, "report")
    data = _data(m["data"], protocol)
    base = _mapping(m.get("base", {}) or {}, "base")
    for k in base:
        if k in _RESERVED:
            raise SpecError(f"base.{k}: set by the spec itself (use the top-level `protocol`/`data`), not in base")
    rows = _rows(m["rows"])
    grid = _grid(m.get("grid", {}) or {})
    search = _search(m["search"]) if m.get("search") is not None else None
    final = _final(m["final"]) if m.get("final") is not None else None
    resources = _resources(m.get("resources", {}) or {})
    if "num_workers" not in m["data"]:
        data = dataclasses.replace(data, num_workers=default_num_workers(resources))
    if any(r.search for r in rows) and search is None:
        bad = next(r for r in rows if r.search)
        raise SpecError(f"rows[{rows.index(bad)}].search: row {bad.name!r} is searched but the spec has no `search:` section")
    _check_seed_axis(grid, search, final)
    canonical = json.dumps(raw, sort_keys=True, default=str)
    spec = ExperimentSpec(
        name=name, protocol=protocol, report=report, data=data, base=base, rows=rows, grid=grid,
        search=search, final=final, resources=resources, path=path,
        hash=hashlib.sha256(canonical.encode()).hexdigest()[:12],
    )
    _check_trial_configs(spec)
    return spec


def _check_trial_configs(spec: ExperimentSpec) -> None:
    """Each row merged with base parses; then every config its trials can get fits (orchestrator/spec_checks.py)."""
    rows = []
    for i, row in enumerate(spec.rows):
        where = f"rows[{i}] ({row.name})"
        try:
            rows.append((where, TrialConfig.from_dict(spec.trial_dict(row, spec.data.datasets[0])), row.search))
        except ConfigError as e:
            raise SpecError(f"{where} merged with base: {e}") from None
    try:
        check_trial_configs(rows, spec.grid, spec.search.params if spec.search is not None else ())
    except ConfigError as e:
        raise SpecError(str(e)) from None


def _check_seed_axis(grid, search: SearchSpec | None, final: FinalSpec | None) -> None:
    """A `seed` axis in `grid` is the sweep's own seed list; the search and final stages set seeds themselves
    (search.seed, final.seeds), so with either section the axis would expand into colliding trials and studies."""
    if not any(key == "seed" for key, _ in grid):
        return
    others = [name for name, section in (("search", search), ("final", final)) if section is not None]
    if others:
        raise SpecError(
            f"grid.seed: a seed axis cannot be combined with {' or '.join(f'`{o}:`' for o in others)} (they choose the seeds: "
            "search.seed, final.seeds); list the seeds in final.seeds, or drop the `search:`/`final:` sections "
            "to sweep the grid's seeds")


def check_descriptions(spec: ExperimentSpec) -> list[str]:
    """HiCroPL rows: every dataset the trials train or evaluate on has descriptions for each of its classes.

    Run before Ray starts (by `prepare_data`, after the demo data is built, and by `--dry-run`). The class
    names come from the built dataset under `data.root`, so a dataset not built yet is not checked: a note
    says so (`prepare_data` refuses an unbuilt dataset anyway). Raises SpecError naming the spec, the row,
    the dataset, the descriptions file and the class.
    """
    from hisf.model.descriptions import TEMPLATES, DescriptionsError
    from hisf.model.descriptions import check_descriptions as check

    transfer = spec.protocol in ("cross_dataset", "domain_generalization")
    keys = spec.data.datasets + (spec.data.targets if transfer else ())
    grid_sources = dict(spec.grid).get("method.descriptions", ())
    classnames: dict[str, tuple[str, ...] | None] = {}
    notes: list[str] = []
    for i, row in enumerate(spec.rows):
        method = spec.trial_dict(row, keys[0]).get("method") or {}
        if method.get("name") != "hicropl":
            continue
        sources = [method.get("descriptions", TEMPLATES), *grid_sources]
        for source in dict.fromkeys(s for s in sources if s != TEMPLATES):
            unbuilt = []
            for key in keys:
                if key not in classnames:
                    classnames[key] = _built_classnames(spec, key)
                if classnames[key] is None:
                    unbuilt.append(key)
                    continue
                try:
                    check(source, key, classnames[key])
                except DescriptionsError as e:
                    raise SpecError(f"{spec.path}: rows[{i}] ({row.name}) method.descriptions on dataset "
                                    f"{key!r}: {e}") from None
            if unbuilt:
                notes.append(f"rows[{i}] ({row.name}): descriptions {source!r} not checked for {', '.join(unbuilt)} "
                             f"(not built under {spec.data.root} yet; checked before a run starts)")
    return notes


def _built_classnames(spec: ExperimentSpec, key: str) -> tuple[str, ...] | None:
    """The class names of dataset `key` under data.root, None when it is not built there."""
    from data_shards import DataError, open_dataset

    folder = Path(spec.data.root) / key
    if not (folder / "manifest.parquet").is_file():
        return None
    try:
        return open_dataset(folder).classnames
    except DataError as e:
        raise SpecError(f"{spec.path}: data: dataset {key!r} at {folder} cannot be opened: {e}") from None


def default_num_workers(r: ResourcesSpec) -> int:
    """`data.num_workers` when a spec leaves it out: on a GPU, decoding JPEGs on the training thread would
    make the GPU wait every step, so every CPU a worker holds but one (the training thread's) decodes;
    a CPU trial decodes in-process (its CPUs already compute the step)."""
    if r.gpus_per_trial <= 0:
        return 0
    return max(1, int(r.cpus_per_trial) - 1)


def _data(v: Any, protocol: str) -> DataSpec:
    m = _mapping(v, "data")
    _keys(m, "data", required=("datasets",), optional=("root", "shots", "targets", "demo", "num_workers"))
    datasets = _dataset_names(m["datasets"], "data.datasets")
    if not datasets:
        raise SpecError("data.datasets: expected at least one dataset key")
    targets = _dataset_names(m.get("targets", []) or [], "data.targets")
    if protocol in ("cross_dataset", "domain_generalization") and not targets:
        raise SpecError(f"data.targets: protocol {protocol!r} needs at least one target dataset")
    shots = _int(m.get("shots", 16), "data.shots", minimum=1)
    root = _str(m.get("root", "data"), "data.root")
    if Path(root).expanduser().exists() and not Path(root).expanduser().is_dir():
        raise SpecError(f"data.root: {root} is a file; expected a folder (the built datasets are its sub-folders, "
                        "and `demo: true` builds demo data there)")
    return DataSpec(
        root=root, datasets=datasets, shots=shots, targets=targets,
        demo=_bool(m.get("demo", False), "data.demo"),
        num_workers=_int(m.get("num_workers", 0), "data.num_workers", minimum=0),
    )


def id_part(text: str) -> str:
    """What a name becomes inside trial ids and folder names (orchestrator/trials.py): lower case, runs of other
    characters than letters, digits and `_.=-` as one `_`."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).lower()


def _dataset_names(v: Any, where: str) -> tuple[str, ...]:
    names = _str_list(v, where)
    for i, name in enumerate(names):
        if not PLAIN_NAME.fullmatch(name):
            raise SpecError(f"{where}[{i}]: {name!r} is not a dataset name; expected a catalogue key (`hisf-bench data "
                            "list`) or the --name of a custom build (letters, digits, '_' or '-'): one folder under "
                            "data.root, not a path")
    return names


def _rows(v: Any) -> tuple[RowSpec, ...]:
    if not isinstance(v, list) or not v:
        raise SpecError(f"rows: expected a non-empty list of rows, got {v!r}")
    rows, seen, ids = [], set(), {}
    for i, item in enumerate(v):
        where = f"rows[{i}]"
        m = _mapping(item, where)
        if "name" not in m:
            raise SpecError(f"{where}.name: missing; every row needs a label (the table row)")
        name = _str(m["name"], f"{where}.name")
        if not name.strip():
            raise SpecError(f"{where}.name: expected a non-empty label (the table row), got {name!r}")
        if name in seen:
            raise SpecError(f"{where}.name: duplicated row name {name!r}")
        seen.add(name)
        # Trial ids and folders carry the row's name as id_part: two rows there would share trial folders.
        if id_part(name) in ids:
            j, other = ids[id_part(name)]
            raise SpecError(f"{where}.name: {name!r} and rows[{j}].name {other!r} give the same trial ids and folders "
                            f"({id_part(name)!r}); rename one")
        ids[id_part(name)] = (i, name)
        overrides = {k: val for k, val in m.items() if k not in ("name", "search")}
        for k in overrides:
            if k in _RESERVED:
                raise SpecError(f"{where}.{k}: set by the spec itself, not per row")
        rows.append(RowSpec(name=name, overrides=overrides, search=_bool(m.get("search", False), f"{where}.search")))
    return tuple(rows)


def _grid(v: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    m = _mapping(v, "grid")
    out = []
    for key, values in m.items():
        where = f"grid.{key}"
        if key.split(".")[0] in _RESERVED:
            raise SpecError(f"{where}: not a grid key (the orchestrator sets protocol, data and output_dir)")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: expected a non-empty list of values, got {values!r}")
        out.append((key, tuple(values)))
    return tuple(out)


def _search(v: Any) -> SearchSpec:
    m = _mapping(v, "search")
    _keys(m, "search", required=("params",),
          optional=("sampler", "n_trials", "seed", "metric", "pruner", "startup_trials"))
    metric = _str(m.get("metric", "val_acc"), "search.metric")
    if not metric.startswith("val"):
        # docs/protocols.md: the search never reads the test split.
        raise SpecError(f"search.metric: expected a validation metric (val_acc), got {metric!r}; the test split never feeds the search")
    if metric not in SEARCH_METRICS:
        raise SpecError(f"search.metric: {metric!r} is not a metric a search trial reports; expected one of "
                        f"{list(SEARCH_METRICS)}")
    params = []
    pm = _mapping(m["params"], "search.params")
    if not pm:
        raise SpecError("search.params: expected at least one parameter range")
    for key, rng in pm.items():
        where = f"search.params.{key}"
        if key.split(".")[0] in _RESERVED or key == "seed":
            # As in the grid: a searched output_dir would make every trial clear and write a folder of the
            # spec's choosing; the search's seed is search.seed.
            raise SpecError(f"{where}: not a search key (the orchestrator sets protocol, data, output_dir, and "
                            "seed from search.seed)")
        r = _mapping(rng, where)
        if "choices" in r:
            _keys(r, where, required=("choices",), optional=())
            if not isinstance(r["choices"], list) or not r["choices"]:
                raise SpecError(f"{where}.choices: expected a non-empty list, got {r['choices']!r}")
            params.append(ParamRange(key=key, choices=tuple(r["choices"])))
            continue
        _keys(r, where, required=("low", "high"), optional=("log", "int"))
        low, high = _num(r["low"], f"{where}.low"), _num(r["high"], f"{where}.high")
        log, is_int = _bool(r.get("log", False), f"{where}.log"), _bool(r.get("int", False), f"{where}.int")
        if is_int:
            for end, value in (("low", low), ("high", high)):
                if value != int(value):
                    raise SpecError(f"{where}.{end}: an integer range (int: true) needs integer bounds, got {value}")
        if high <= low:
            raise SpecError(f"{where}.high: expected > low ({low}), got {high}")
        if log and low <= 0:
            raise SpecError(f"{where}.low: a log range needs low > 0, got {low}")
        params.append(ParamRange(key=key, low=low, high=high, log=log, int=is_int))
    return SearchSpec(
        sampler=_choice(m.get("sampler", "tpe"), SAMPLERS, "search.sampler"),
        n_trials=_int(m.get("n_trials", 20), "search.n_trials", minimum=1),
        seed=_seed(m.get("seed", 1), "search.seed"),
        metric=metric,
        pruner=_choice(m.get("pruner", "median"), PRUNERS, "search.pruner"),
        params=tuple(params),
        startup_trials=_int(m.get("startup_trials", 5), "search.startup_trials", minimum=0),
    )


def _final(v: Any) -> FinalSpec:
    m = _mapping(v, "final")
    _keys(m, "final", required=("seeds",), optional=())
    seeds = m["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(f"final.seeds: expected a non-empty list of integers, got {seeds!r}")
    out = tuple(_seed(s, f"final.seeds[{i}]") for i, s in enumerate(seeds))
    if len(set(out)) != len(out):
        raise SpecError(f"final.seeds: duplicated seed in {list(out)}")
    return FinalSpec(seeds=out)


def _resources(v: Any) -> ResourcesSpec:
    m = _mapping(v, "resources")
    _keys(m, "resources", required=(), optional=(
        "cpus_per_trial", "gpus_per_trial", "workers_per_trial", "max_concurrent_trials", "max_failures",
        "keep_checkpoints", "fuse", "gpu_memory_gib"))
    gpus = _num(m.get("gpus_per_trial", 0), "resources.gpus_per_trial")
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise SpecError(f"resources.gpus_per_trial: expected 0 or a fraction in (0, 1] (GPUs per worker), got {gpus}")
    cpus = _num(m.get("cpus_per_trial", 1), "resources.cpus_per_trial")
    if cpus <= 0:
        raise SpecError(f"resources.cpus_per_trial: expected > 0, got {cpus}")
    if gpus > 1:
        # Each trial process (or DDP worker) trains on one device: more GPUs per worker would sit reserved, idle.
        raise SpecError(f"resources.gpus_per_trial: {gpus:g} GPUs per worker, but a worker uses one device; expected "
                        f"at most 1 (per worker); for DDP over {gpus:g} GPUs set workers_per_trial: {gpus:g} and "
                        f"gpus_per_trial: 1")
    workers = _int(m.get("workers_per_trial", 1), "resources.workers_per_trial", minimum=1)
    if workers > 1 and 0 < gpus < 1:
        raise SpecError("resources.gpus_per_trial: a DDP trial (workers_per_trial > 1) needs whole GPUs per worker")
    return ResourcesSpec(
        cpus_per_trial=cpus, gpus_per_trial=gpus, workers_per_trial=workers,
        max_concurrent_trials=_int(m.get("max_concurrent_trials", 2), "resources.max_concurrent_trials", minimum=1),
        max_failures=_int(m.get("max_failures", 2), "resources.max_failures", minimum=0),
        keep_checkpoints=_bool(m.get("keep_checkpoints", False), "resources.keep_checkpoints"),
        fuse=_fuse(m.get("fuse", 1)),
        gpu_memory_gib=_positive(m.get("gpu_memory_gib", 80.0), "resources.gpu_memory_gib"),
    )


def _fuse(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SpecError(f"resources.fuse: expected a group size >= 1 (1: every trial alone) or 'auto', got {v!r}")
    return v


def _positive(v: Any, where: str) -> float:
    x = _num(v, where)
    if x <= 0:
        raise SpecError(f"{where}: expected > 0, got {v!r}")
    return x


def _deep_merge(base: dict, over: Mapping) -> dict:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping):
            base[k] = _deep_merge(dict(base[k]), v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _typed(v: Any, tp: Any, where: str) -> Any:
    """hisf.config's strict coercion (the trial config's own: same types, same messages), as a SpecError."""
    try:
        return coerce(v, tp, where)
    except ConfigError as e:
        raise SpecError(str(e)) from None


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    _typed(v, Mapping, where)
    for k in v:
        if not isinstance(k, str):
            raise SpecError(f"{where}: keys must be strings, got {k!r}")
    return v


def _keys(m: Mapping, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    prefix = f"{where}." if where else ""
    allowed = set(required) | set(optional)
    for k in m:
        if k not in allowed:
            raise SpecError(f"{prefix}{k}: unknown key; expected one of {sorted(allowed)}")
    for k in required:
        if k not in m:
            raise SpecError(f"{prefix}{k}: missing required key")


def _str(v: Any, where: str) -> str:
    return _typed(v, str, where)


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    return _typed(v, tuple[str, ...], where)


def _bool(v: Any, where: str) -> bool:
    return _typed(v, bool, where)


def _int(v: Any, where: str, minimum: int | None = None) -> int:
    v = _typed(v, int, where)
    if minimum is not None and v < minimum:
        raise SpecError(f"{where}: expected an integer >= {minimum}, got {v}")
    return v


def _seed(v: Any, where: str) -> int:
    try:
        return check_seed(_int(v, where), where)
    except ConfigError as e:
        raise SpecError(str(e)) from None


def _num(v: Any, where: str) -> float:
    """A finite number (NaN or inf would fail every trial, or poison a study's ranges)."""
    return _typed(v, float, where)


def _choice(v: Any, choices: tuple[str, ...], where: str) -> str:
    if v not in choices:
        raise SpecError(f"{where}: unknown value {v!r}; expected one of {list(choices)}")
    return v
