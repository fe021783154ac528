"""Pre-flight checks on the driver, before Ray starts and in `--dry-run`: data, shots, backbone weights, cluster storage.

A trial that cannot start fails the same way in every retry on every node, after the cluster has been
scheduled; each check here turns that into one error, naming the spec key and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from orchestrator.spec import ExperimentSpec, SpecError

# File systems every node of a cluster can see (from /proc/mounts); anything else is taken as node-local.
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "cephfs", "beegfs", "glusterfs", "fuse.glusterfs",
             "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.cephfs", "panfs", "wekafs")


class PreflightError(SpecError):
    """Something every trial needs is missing; the message lists each problem with what to do."""


def with_weights_cache(spec: ExperimentSpec, cache_dir: str | None) -> ExperimentSpec:
    """`--weights-cache DIR`: every trial's `backbone.cache_dir` (rows too), so the driver and all workers
    read the same cached file. The spec hash is unchanged: where weights are cached is not the experiment."""
    if not cache_dir:
        return spec
    cache = str(Path(cache_dir).expanduser().resolve())
    base = dict(spec.base)
    base["backbone"] = {**dict(base.get("backbone") or {}), "cache_dir": cache}
    rows = tuple(dataclasses.replace(r, overrides={**r.overrides, "backbone": {**dict(r.overrides["backbone"]),
                                                                                  "cache_dir": cache}})
                 if isinstance(r.overrides.get("backbone"), dict) else r for r in spec.rows)
    return dataclasses.replace(spec, base=base, rows=rows)


def check(spec: ExperimentSpec, needs_test: bool = True, dry_run: bool = False, out: TextIO | None = None) -> None:
    """Data and weights for every trial of the spec; raises one PreflightError listing every problem.

    `needs_test`: the source datasets must have a test split (not for the search stage alone).
    `dry_run`: demo datasets not built yet are fine (the run builds them first)."""
    out = out or sys.stdout
    problems = check_data(spec, needs_test, dry_run, out) + check_weights(spec, out)
    if problems:
        raise PreflightError(f"{spec.path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} before any "
                             "trial could start:\n  - " + "\n  - ".join(problems))


def _first_seed(spec: ExperimentSpec) -> int:
    if spec.final is not None:
        return spec.final.seeds[0]
    if spec.search is not None:
        return spec.search.seed
    return int(spec.base.get("seed", 1))


def check_data(spec: ExperimentSpec, needs_test: bool = True, dry_run: bool = False, out: TextIO | None = None) -> list[str]:
    """Each dataset folder exists, is built, holds the dataset the spec names with the splits the protocol
    reads, and (sources) has K train images in every training class."""
    import numpy as np

    from data_shards import DataError, open_dataset

    root = Path(spec.data.root).resolve()
    problems = []
    entries = [(f"data.datasets[{i}]", k, True) for i, k in enumerate(spec.data.datasets)]
    entries += [(f"data.targets[{i}]", k, False) for i, k in enumerate(spec.data.targets)]
    for where, key, source in entries:
        path = root / key
        if not (path / "manifest.parquet").is_file():
            if dry_run and spec.data.demo and source:
                print(f"preflight: {where}: demo dataset {key!r} is built under {root} when the run starts", file=out)
                continue
            problems.append(f"{where}: no built dataset {key!r} at {path} (data.root={spec.data.root!r}); build it with "
                            f"`hisf-bench data build --dataset {key} --root DATA --out {path}`")
            continue
        try:
            ds = open_dataset(path)
        except (DataError, OSError, ValueError, KeyError) as e:
            problems.append(f"{where}: {path} is not a readable built dataset: {e}")
            continue
        if ds.key != key:
            problems.append(f"{where}: {path} holds dataset {ds.key!r}, expected {key!r}; name it {ds.key!r} in the "
                            f"spec or point data.root at the folder that holds {key!r}")
            continue
        needs = (("train", "val", "test") if needs_test else ("train", "val")) if source else ("test",)
        missing = [s for s in needs if s not in ds.splits]
        if missing:
            problems.append(f"{where}: dataset {key!r} at {path} has no {missing[0]!r} split (has {list(ds.splits)}); "
                            f"protocol {spec.protocol!r} reads {list(needs)}")
            continue
        if not source:
            continue
        classes = "base" if spec.protocol == "base2new" else "all"
        k, seed = spec.data.shots, _first_seed(spec)
        try:
            train = ds.select("train", shots=k, seed=seed, classes=classes)
            val = ds.select("val", shots=k, seed=seed, classes=classes)
        except DataError as e:
            problems.append(f"{where}: {e}")
            continue
        counts = np.bincount(train.labels, minlength=len(train.classnames))
        fewer = [(train.classnames[i], int(c)) for i, c in enumerate(counts) if c < k]
        if fewer:
            listed = ", ".join(f"{n!r} ({c})" for n, c in fewer[:10]) + (f", ... ({len(fewer) - 10} more)" if len(fewer) > 10 else "")
            problems.append(f"data.shots: {k} shots per class, but {len(fewer)} of the {len(counts)} {classes} classes of "
                            f"{key!r} have fewer train images: {listed}; lower data.shots or add images to those classes")
        if len(val) == 0:
            problems.append(f"{where}: dataset {key!r} has no validation images for its {classes} classes")
        print(f"preflight: {key}: {len(train)} train images ({k} shots x {len(counts)} {classes} classes), "
              f"{len(val)} validation", file=out)
    return problems


def backbone_configs(spec: ExperimentSpec) -> list[Any]:
    """The distinct BackboneConfigs of every row at every grid point."""
    from orchestrator.trials import build_config, grid_points

    seen = []
    # Only grid axes under `backbone.` change the backbone: a 1,000-point grid over other keys is one config per row.
    points = grid_points(spec) if any(k.startswith("backbone.") for k, _ in spec.grid) else [()]
    for row in spec.rows:
        for point in points:
            cfg = build_config(spec, row, spec.data.datasets[0], point, _first_seed(spec), None, "").backbone
            if cfg not in seen:
                seen.append(cfg)
    return seen


def check_weights(spec: ExperimentSpec, out: TextIO | None = None) -> list[str]:
    """Local checkpoints are weights files we load; pretrained tags are fetched once here into the cache (or found
    there)."""
    import open_clip

    from hisf.model.backbone import BackboneError, check_weights_file, fetch_weights

    problems = []
    for cfg in backbone_configs(spec):
        p = cfg.pretrained
        if not p:
            continue
        if Path(p).exists():
            try:
                check_weights_file(p)  # read once here: a file that is no checkpoint fails every trial alike
            except BackboneError as e:
                problems.append(str(e))
            continue
        is_tag = cfg.model_cfg is None and bool(open_clip.get_pretrained_cfg(cfg.name, p))
        if not is_tag:
            problems.append(f"backbone.pretrained: {p!r} is neither an existing checkpoint file nor a pretrained tag of "
                            f"{cfg.name!r} (tags: {open_clip.list_pretrained_tags_by_model(cfg.name)})")
            continue
        try:
            path = fetch_weights(cfg)
        except BackboneError as e:
            problems.append(str(e))
            continue
        print(f"preflight: weights {cfg.name}/{p}: {path}", file=out)
    return problems


# ---- multi-node clusters: stores and folders every node can see -------------------------------------------


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (longest mount point prefix in /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    p = str(path.resolve())
    best, kind = "", ""
    for point, fs in mounts:
        point = point.replace("\\040", " ")
        if (p == point or p.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fs
    return kind


def _local(path: str | Path) -> bool:
    return _fs_type(Path(path)) not in SHARED_FS


def _sqlite_or_file(url: str) -> bool:
    return url.startswith("sqlite:") or url.startswith("file:") or "://" not in url


def storage_problems(spec: ExperimentSpec, opts: Any) -> list[str]:
    """What only the driver's machine can see, for a run on a multi-node cluster."""
    return [problem for _, problem in _storage_findings(spec, opts)]


def _storage_findings(spec: ExperimentSpec, opts: Any) -> list[tuple[str, str]]:
    """(what, the problem and the flag that fixes it) for each store or folder that looks local."""
    found = []
    if _sqlite_or_file(opts.tracking_uri):
        found.append(("the SQLite tracking store", f"tracking store {opts.tracking_uri!r} is a file on this machine: "
                      "pass `--tracking-uri http://HOST:5000` (an `mlflow server` every node reaches; "
                      "`hisf-bench stores serve` on the head node starts one and prints the flags)"))
    if spec.search is not None and _sqlite_or_file(opts.optuna_storage):
        found.append(("the SQLite Optuna storage", f"Optuna storage {opts.optuna_storage!r} is a file on this "
                      "machine: pass `--optuna-storage postgresql://USER@HOST/DB` (or mysql://...) every node reaches"))
    if _local(opts.workdir):
        found.append((f"--workdir {opts.workdir}", f"--workdir {opts.workdir} is on a local file system "
                      f"({_fs_type(Path(opts.workdir)) or 'unknown'}): pass `--workdir /shared/...` on storage every "
                      "node mounts"))
    root = Path(spec.data.root)
    if _local(root):
        found.append((f"data.root {root.resolve()}", f"data.root {spec.data.root!r} ({root.resolve()}) is on a local "
                      "file system: put the built datasets on storage every node mounts and give that path as data.root"))
    caches = {cfg.cache_dir for cfg in backbone_configs(spec) if cfg.pretrained and cfg.cache_dir}
    for cache in sorted(caches):
        if _local(cache):
            found.append((f"--weights-cache {cache}", f"--weights-cache {cache} is on a local file system: workers on "
                          "other nodes would not find the weights fetched here; pass a folder on shared storage"))
    return found


# Notes already printed by this process: `run` checks the cluster before each of its stages.
_NOTED: set[str] = set()


def check_cluster(spec: ExperimentSpec, opts: Any, alive_nodes: int, out: TextIO | None = None) -> None:
    """Refuse a multi-node cluster with stores or folders on this machine only, unless `--shared-storage`."""
    if alive_nodes <= 1:
        return
    found = _storage_findings(spec, opts)
    if not found:
        return
    if getattr(opts, "shared_storage", False):
        # The user said so already: one short line naming what is taken as shared, once per command.
        note = (f"preflight: {alive_nodes} Ray nodes; as --shared-storage says, every node sees "
                + ", ".join(what for what, _ in found))
        if note not in _NOTED:
            _NOTED.add(note)
            print(note, file=out or sys.stdout)
        return
    raise PreflightError(
        f"{spec.path}: the Ray cluster has {alive_nodes} nodes, but trials on other nodes would write to or read "
        "from places only this machine sees:\n  - " + "\n  - ".join(p for _, p in found) +
        "\nPass the flags above, or `--shared-storage` if these paths are on storage every node mounts.")


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


# ---- stores and the workdir: reachable, with their drivers, writable (seconds, before any MLflow run) ---------

# SQLAlchemy driver modules -> what to install for them.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "pg8000": "pg8000", "pyodbc": "pyodbc", "oracledb": "oracledb"}
STORE_TIMEOUT_S = 5


def check_stores(opts: Any, needs_optuna: bool, dry_run: bool = False, writes: bool = True) -> None:
    """The workdir can be written (`writes`: the command writes there), `--tracking-uri` answers (an MLflow
    server, or a database whose driver is installed) and, when the command reads studies, so does
    `--optuna-storage`; one PreflightError naming each flag and its fix.

    `dry_run`: nothing is created (a folder is judged by its nearest existing ancestor). A SQLite store is
    judged by its folder, a server database by a `SELECT 1`."""
    problems = [p for p in (_workdir_problem(opts.workdir, dry_run) if writes else None,
                            _tracking_problem(opts.tracking_uri, dry_run),
                            _database_problem("--optuna-storage", opts.optuna_storage, dry_run) if needs_optuna else None)
                if p]
    if problems:
        raise PreflightError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} with the stores or the "
                             "workdir before anything ran:\n  - " + "\n  - ".join(problems))


def _os_reason(e: OSError) -> str:
    import errno

    return f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else str(e)


def _folder_problem(flag: str, folder: Path, dry_run: bool) -> str | None:
    """`folder`, or the nearest of its parents that exists, takes a new entry; nothing is left behind (a bad
    spec found later must not have made a workdir). A dry run only asks the permissions."""
    import os
    import tempfile

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{flag} {folder}: {probe} is not a folder; pass a folder you can write to"
    if dry_run:
        if os.access(probe, os.W_OK | os.X_OK):
            return None
        return f"{flag} {folder}: {probe} is not writable; pass a folder you can write to"
    try:
        with tempfile.TemporaryDirectory(dir=probe, prefix=".hisf-bench-write-test-"):
            pass
    except OSError as e:
        return f"{flag} {folder}: cannot write there: {_os_reason(e)}; pass a folder you can write to"
    return None


def _workdir_problem(workdir: str, dry_run: bool) -> str | None:
    return _folder_problem("--workdir", Path(workdir), dry_run)


def _tracking_problem(uri: str, dry_run: bool) -> str | None:
    if uri.startswith(("http://", "https://")):
        return _http_problem(uri)
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):] if uri.startswith("file:") else uri)
        return _folder_problem("--tracking-uri", path, dry_run)
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc", "uc"):
        return None  # MLflow's own clients; they answer with their own errors
    return _database_problem("--tracking-uri", uri, dry_run)


def _http_problem(uri: str) -> str | None:
    """Something answers HTTP at the tracking server (any status counts: only a dead address is refused)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=STORE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return (f"--tracking-uri {uri}: no MLflow server answers there within {STORE_TIMEOUT_S} s ({reason}); "
                "start one (`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) "
                "or pass the URL of a running one (leave the flag out for the workdir's SQLite store)")
    return None


def _database_problem(flag: str, url: str | None, dry_run: bool) -> str | None:
    """A SQLAlchemy URL: parsed, its driver importable, and (server databases) a connection within seconds."""
    import sqlalchemy as sa

    if not url:
        return None
    shown = _redacted(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return (f"{flag} {shown}: not a database URL; expected a SQLAlchemy URL such as sqlite:////abs/path.db, "
                "postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB")
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return f"{flag} {shown}: an in-memory SQLite database keeps nothing; give a file (sqlite:////abs/path.db)"
        return _folder_problem(flag, Path(parsed.database).expanduser().resolve().parent, dry_run)
    connect_args = {"connect_timeout": STORE_TIMEOUT_S} if parsed.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sa.create_engine(parsed, connect_args=connect_args, poolclass=sa.pool.NullPool)
    except sa.exc.NoSuchModuleError:
        return (f"{flag} {shown}: SQLAlchemy knows no database {parsed.drivername!r}; expected sqlite, postgresql, "
                "mysql, mssql or oracle (optionally with a driver, e.g. postgresql+psycopg)")
    except ImportError as e:
        module = getattr(e, "name", None) or str(e)
        package = DRIVER_PACKAGES.get(module, module)
        return (f"{flag} {shown}: the database driver {module!r} is not installed; `pip install {package}`, or name "
                f"an installed driver in the URL ({parsed.get_backend_name()}+DRIVER://...)")
    try:
        with engine.connect() as con:
            con.execute(sa.text("SELECT 1"))
    except ImportError as e:
        return f"{flag} {shown}: a database driver is missing: {e}"
    except Exception as e:  # sqlalchemy.exc.OperationalError and the like: name the first line
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        return f"{flag} {shown}: cannot connect within {STORE_TIMEOUT_S} s: {first}; check the host, port, database and credentials"
    finally:
        engine.dispose()
    return None


def _redacted(url: str) -> str:
    from orchestrator.context import redact

    return redact(url)
