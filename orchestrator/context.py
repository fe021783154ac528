"""What a stage runs with: the user's options (store defaults defined here, once) and the typed, frozen
context every trial of the stage receives beside its TrialConfig.

`run`, `status` and `report` all read the default workdir, MLflow tracking URI and Optuna storage from here.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DEFAULT_WORKDIR = "hisf-bench"


def default_tracking_uri(workdir: str | Path = DEFAULT_WORKDIR) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def default_optuna_storage(workdir: str | Path = DEFAULT_WORKDIR) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'optuna.db'}"


def redact(url: str | None) -> str:
    """A store URL fit for tags and logs: never a database password."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


@dataclass
class Options:
    """The command line's choices for one `run`/`sweep`/`search`/`final`/`status`."""

    workdir: str = DEFAULT_WORKDIR
    address: str | None = None
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    resume: bool = False
    dry_run: bool = False
    # Local Ray only: CPUs the embedded cluster offers (default: enough for max_concurrent_trials).
    num_cpus: int | None = None
    # The user declares that --workdir, data.root and the stores are on storage every node sees (a
    # multi-node cluster is otherwise refused when they look local: orchestrator.preflight.check_cluster).
    shared_storage: bool = False
    # Ray's own output on the console too (else only in <workdir>/logs/<spec>-<stage>.log).
    verbose: bool = False
    # Seconds between plain progress lines when the console is not a terminal.
    progress_every: float = 10.0
    # `status`: read every child run instead of each launch's record (orchestrator/records.py).
    full_read: bool = False
    out: Any = field(default_factory=lambda: sys.stdout)  # looked up when made: capture-friendly

    def resolved(self) -> "Options":
        """An absolute workdir and the default stores under it where none was given."""
        wd = str(Path(self.workdir).resolve())
        return dataclasses.replace(self, workdir=wd, tracking_uri=self.tracking_uri or default_tracking_uri(wd),
                                   optuna_storage=self.optuna_storage or default_optuna_storage(wd))


@dataclass(frozen=True)
class RunContext:
    """Everything a trial of a stage needs besides its own TrialConfig: where to track, what to tell Optuna,
    the resources it runs with, the folders it owns, and the facts its identity is made of.

    It travels to Ray workers as a plain dict (`to_dict`/`from_dict`, as Trial.payload does)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    spec_name: str
    spec_hash: str
    git_commit: str
    # sha256 over the numerical code (hisf/, data_shards/), 16 hex: part of every trial's identity.
    code_fingerprint: str
    # (dataset key, BuiltDataset.fingerprint) for every dataset the spec reads.
    data_fingerprints: tuple[tuple[str, str], ...]
    optuna_storage: str = ""
    metric: str = "val_acc"
    pruner: str = "none"
    startup_trials: int = 0
    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    max_failures: int = 0
    keep_checkpoints: bool = False
    # Folders the stage owns (orchestrator.paths refuses deletions outside them).
    runs_root: str = ""  # <workdir>/runs/<spec>: the trial folders
    storage_path: str = ""  # <workdir>/ray_results: Tune's and Ray Train's copies
    # The final stage: the search launch (MLflow parent run) whose best values its searched rows took.
    search_run_id: str = ""

    @property
    def optuna_storage_display(self) -> str:
        return redact(self.optuna_storage)

    def data_fingerprint(self, key: str) -> str:
        return dict(self.data_fingerprints).get(key, "")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_fingerprints"] = [list(p) for p in self.data_fingerprints]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunContext":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RunContext: unknown keys {unknown}")
        values = dict(d)
        values["data_fingerprints"] = tuple((str(k), str(v)) for k, v in d.get("data_fingerprints", ()))
        return cls(**values)


def stage_context(spec, opts: Options, experiment_id: str, parent_run_id: str, search_run_id: str = "") -> RunContext:
    """The context of one stage launch of `spec` (its identity facts computed here, once, on the driver)."""
    from orchestrator.identity import code_fingerprint, data_fingerprints
    from orchestrator.tracking import git_commit
    from orchestrator.trials import trials_root

    r, s = spec.resources, spec.search
    return RunContext(
        tracking_uri=opts.tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        spec_name=spec.name, spec_hash=spec.hash, git_commit=git_commit(), code_fingerprint=code_fingerprint(),
        data_fingerprints=data_fingerprints(spec), optuna_storage=opts.optuna_storage or "",
        metric=s.metric if s else "val_acc", pruner=s.pruner if s else "none",
        startup_trials=s.startup_trials if s else 0,
        workers_per_trial=r.workers_per_trial, gpus_per_trial=r.gpus_per_trial, cpus_per_trial=r.cpus_per_trial,
        max_failures=r.max_failures, keep_checkpoints=r.keep_checkpoints,
        runs_root=str(trials_root(opts.workdir, spec)), storage_path=str(Path(opts.workdir) / "ray_results"),
        search_run_id=search_run_id,
    )
