"""The environments a table's runs came from (their `env.*` tags, orchestrator/environment.py), and whether they mix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from orchestrator.environment import PREFIX

from .runs import TrialRun

# What changes the numbers a run gives, in the order the report shows it. The host, the driver's patch level
# and the orchestration packages are listed per environment but do not split one.
KEYS = ("torch", "cuda", "cudnn", "gpu", "gpu_count", "python", "open_clip_torch", "precision", "compile",
        "git_commit", "git_dirty")
SHOWN = KEYS + ("driver", "webdataset", "pyarrow", "ray", "mlflow", "optuna")
UNRECORDED = "(not recorded)"


@dataclass(frozen=True)
class Environment:
    values: tuple[tuple[str, str], ...]  # (key, value) over KEYS
    details: tuple[tuple[str, str], ...]  # the other SHOWN keys: their values over the runs, ", "-joined
    run_ids: tuple[str, ...]
    hosts: tuple[str, ...]
    cells: tuple[str, ...]  # "row on dataset" of the runs

    def value(self, key: str) -> str:
        return dict(self.values).get(key) or dict(self.details).get(key, "")


@dataclass(frozen=True)
class EnvironmentSummary:
    environments: tuple[Environment, ...]  # most runs first, then earliest
    differing: tuple[str, ...]  # KEYS whose values differ between environments
    unrecorded: tuple[str, ...]  # run ids without an environment record (runs tracked before it existed)

    @property
    def mixed(self) -> bool:
        return len(self.environments) > 1 or bool(self.environments and self.unrecorded)

    def note(self) -> str | None:
        """One sentence for the top of a report when the table's runs mix environments, else None."""
        if not self.mixed:
            return None
        parts = []
        if len(self.environments) > 1:
            diffs = "; ".join(f"{k} " + " vs ".join(dict.fromkeys(e.value(k) for e in self.environments))
                              for k in self.differing)
            parts.append(f"{len(self.environments)} environments ({diffs})")
        if self.unrecorded:
            parts.append(f"{len(self.unrecorded)} run(s) without an environment record")
        return "This table mixes runs from " + " and ".join(parts) + ": compare its cells with care."


def environment_of(run: TrialRun) -> tuple[tuple[str, str], ...] | None:
    """The run's KEYS values, None when the run has no `env.*` tag at all."""
    if not any(k.startswith(PREFIX) for k in run.tags):
        return None
    return tuple((k, run.tags.get(PREFIX + k, UNRECORDED)) for k in KEYS)


def summarise_environments(runs: Iterable[TrialRun]) -> EnvironmentSummary:
    groups: dict[tuple, list[TrialRun]] = {}
    unrecorded = []
    for run in runs:
        env = environment_of(run)
        if env is None:
            unrecorded.append(run.run_id)
        else:
            groups.setdefault(env, []).append(run)
    envs = []
    # Most runs first; among equals, the one that started first.
    for values, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), min(r.start_time for r in kv[1]))):
        details = tuple((k, ", ".join(sorted({r.tags.get(PREFIX + k, UNRECORDED) for r in members})))
                        for k in SHOWN if k not in KEYS)
        envs.append(Environment(values, details, tuple(r.run_id for r in members),
                                tuple(sorted({r.tags.get(PREFIX + "hostname", UNRECORDED) for r in members})),
                                tuple(dict.fromkeys(f"{r.row} on {r.dataset}" for r in members))))
    differing = tuple(k for k in KEYS if len({e.value(k) for e in envs}) > 1)
    return EnvironmentSummary(tuple(envs), differing, tuple(unrecorded))


def markdown_lines(summary: EnvironmentSummary) -> list[str]:
    """The report's `## Environments` section (Markdown)."""
    lines = ["## Environments", ""]
    if not summary.environments and not summary.unrecorded:
        return lines + ["No finished run in the table yet.", ""]
    note = summary.note()
    if note:
        lines += [f"**{note}**", ""]
    if summary.environments:
        lines.append("| | " + " | ".join(f"env {i + 1}" for i in range(len(summary.environments))) + " |")
        lines.append("|---|" + "---|" * len(summary.environments))
        lines.append("| runs | " + " | ".join(str(len(e.run_ids)) for e in summary.environments) + " |")
        for key in SHOWN:
            mark = " (differs)" if key in summary.differing else ""
            lines.append(f"| {key}{mark} | " + " | ".join(e.value(key) for e in summary.environments) + " |")
        lines.append("| hosts | " + " | ".join(", ".join(e.hosts) for e in summary.environments) + " |")
        if len(summary.environments) > 1:
            lines.append("| cells | " + " | ".join(", ".join(e.cells) for e in summary.environments) + " |")
    if summary.unrecorded:
        lines += ["", f"Without an environment record: {len(summary.unrecorded)} run(s) ({', '.join(summary.unrecorded)})."]
    return lines + [""]
