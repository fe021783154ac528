"""A trial's identity: what must agree for a recorded run to be the same trial as the one about to run.

Four parts: the trial's resolved config (searched values included; runtime-only keys such as output_dir,
device, num_workers and cache_dir dropped, as `hisf.engine.checkpoint.identity` does for a checkpoint),
the spec hash, the data builds it reads (`BuiltDataset.fingerprint`), and the numerical code (a sha256
over the files of hisf/ and data_shards/, so a docs or orchestrator-only change keeps finished runs).
Every trial's MLflow run carries them as tags (`hisf.identity` and one tag per part, beside
`hisf.git_commit`); `--resume` reuses a finished run only when all agree, and says which part differs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parent.parent
# The packages whose code computes a trial's numbers.
CODE_PACKAGES = ("hisf", "data_shards")

TAG = "hisf.identity"
PART_TAGS = {"config": "hisf.identity.config", "spec": "hisf.spec_hash", "data": "hisf.data_fingerprint",
             "code": "hisf.code_fingerprint"}
PART_NAMES = {"config": "config", "spec": "spec hash", "data": "data build", "code": "code"}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_fingerprint(root: str | Path = REPO) -> str:
    """16 hex digits over every source file of hisf/ and data_shards/ (path and bytes; caches, compiled
    files and Markdown left out): the same code gives the same value on any machine."""
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for path in sorted((Path(root) / pkg).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".md"):
                continue
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def data_fingerprints(spec) -> tuple[tuple[str, str], ...]:
    """(key, fingerprint) for each dataset and target of the spec under data.root; "" for one not built
    (or unreadable) there."""
    from data_shards import DataError, open_dataset

    out = []
    for key in dict.fromkeys(tuple(spec.data.datasets) + tuple(spec.data.targets)):
        folder = Path(spec.data.root) / key
        fp = ""
        if (folder / "manifest.parquet").is_file():
            try:
                fp = open_dataset(folder).fingerprint
            except (DataError, OSError, KeyError, ValueError):
                fp = ""
        out.append((key, fp))
    return tuple(out)


def config_identity(cfg) -> dict[str, Any]:
    """The keys of a trial config that decide its numbers (runtime-only keys dropped)."""
    from hisf.engine.checkpoint import identity

    return identity(cfg)


@dataclass(frozen=True)
class TrialIdentity:
    config: str  # digest of config_identity(cfg)
    spec: str  # the spec hash
    data: str  # `key:fingerprint,...` of the datasets the trial reads
    code: str  # code_fingerprint()

    @property
    def digest(self) -> str:
        return _digest([self.config, self.spec, self.data, self.code])

    def tags(self) -> dict[str, str]:
        return {TAG: self.digest, **{PART_TAGS[p]: getattr(self, p) for p in PART_TAGS}}


def trial_identity(cfg, ctx) -> TrialIdentity:
    """The identity of a trial with config `cfg` in the stage whose RunContext is `ctx`."""
    keys = [cfg.data.dataset] + (list(cfg.data.targets) if cfg.evaluate_test else [])
    data = ",".join(f"{k}:{ctx.data_fingerprint(k)}" for k in keys)
    return TrialIdentity(config=_digest(config_identity(cfg)), spec=ctx.spec_hash, data=data,
                         code=ctx.code_fingerprint)


def differences(now: TrialIdentity, cfg, tags: Mapping[str, str], params: Mapping[str, str]) -> list[tuple[str, str]]:
    """Which parts of a recorded run's identity (its tags, and its params for the config) differ from `now`:
    (part, detail) pairs, empty when it is the same trial."""
    if tags.get(TAG) == now.digest:
        return []
    if TAG not in tags:
        return [("recorded", "no identity recorded (a run of an older hisf-bench)")]
    out = []
    if tags.get(PART_TAGS["config"]) != now.config:
        from orchestrator.tracking import param_str

        # A run logs only the method keys its method reads (trial_callback.tracked_params): the others are not
        # on record to compare, and do not change its numbers.
        keys = sorted(k for k, v in config_identity(cfg).items() if k in params and params[k] != param_str(v))
        shown = ", ".join(f"{k} {params.get(k, 'unset')} there, {param_str(config_identity(cfg)[k])} now"
                          for k in keys[:3])
        out.append(("config", shown + (f", +{len(keys) - 3} more" if len(keys) > 3 else "") if keys else "another config"))
    for part, label in (("spec", "hash"), ("data", ""), ("code", "fingerprint")):
        was, is_ = tags.get(PART_TAGS[part], ""), getattr(now, part)
        if was != is_:
            out.append((part, f"{label + ' ' if label else ''}{was or 'unset'} there, {is_ or 'unset'} now"))
    return out or [("recorded", "another identity")]
