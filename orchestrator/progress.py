"""What a user sees while a stage runs: one live progress line, with Ray's own output sent to a log file.

Ray Tune and Ray itself print experiment boxes, a TensorBoard hint, "checkpoint successfully created" lines,
log-dedup and auth-token notices and trial tables, from Python, from C++ and from worker processes through
the driver's log monitor. Quieting each at its source depends on Ray's version; redirecting the driver's
own stdout/stderr file descriptors catches all of it. So while Ray runs, fds 1 and 2 point at
`<workdir>/logs/<spec>-<stage>.log`, and the progress line goes to a duplicate of the console taken before.
`--verbose` leaves the console as it is (Ray's output shows there, and plain progress lines between it).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

from ray.tune import Callback

from orchestrator.results import STATUS_KEY, STATUSES, member_results


def log_path(workdir: str | Path, spec_name: str, stage: str) -> Path:
    return Path(workdir) / "logs" / f"{spec_name}-{stage}.log"


@contextlib.contextmanager
def ray_output_to_log(out: TextIO, log: Path, verbose: bool) -> Iterator[TextIO]:
    """Send everything written to fds 1 and 2 to `log` (appended) until the block ends; yields the stream the
    progress line goes to (`out`, or a duplicate of the real console when `out` is the process's stdout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}"
                f"{' (--verbose: Ray output went to the console)' if verbose else ''}\n")
    if verbose:
        yield out
        return
    for s in (sys.stdout, sys.stderr, out):
        with contextlib.suppress(Exception):
            s.flush()
    console = out
    if _fileno(out) in (1, 2):
        # `out` writes to an fd about to point at the log: write through a duplicate of the console instead.
        console = os.fdopen(os.dup(_fileno(out)), "w", buffering=1, encoding="utf-8", errors="replace")
    saved = (os.dup(1), os.dup(2))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield console
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for x in (*saved, fd):
            os.close(x)
        if console is not out:
            console.close()


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class StageProgress(Callback):
    """A Tune callback that keeps one progress line per stage: finished / running / failed / pruned of N member
    trials (a Tune trial runs a group of them, docs/fusion.md), the retries of errored Tune trials (when there were
    any), elapsed time, ETA, and (search) the best validation
    value so far.

    On a terminal the line is redrawn in place (`\\r`) at most once a second; otherwise (CI logs, pipes) a
    plain line is printed when something changed and `every` seconds passed, and at least every 5 × `every`.
    `prior` counts the stage's trials already done before this run (`--resume`), by status.
    """

    def __init__(self, stage: str, total: int, console: TextIO, prior: Mapping[str, int] | None = None,
                 metric: str | None = None, best: float | None = None, every: float = 10.0,
                 live: bool | None = None):
        self.stage, self.total, self.console, self.metric, self.best = stage, total, console, metric, best
        self.prior = dict(prior or {})
        self.counts = {s: 0 for s in STATUSES if s != "running"}
        self.running: dict[str, int] = {}  # Tune trial id -> its group's member count
        self.retries = 0
        self.every = every
        self.live = bool(live if live is not None else getattr(console, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_text = ""
        self._changed = True

    # Tune pickles the run config (and so its callbacks) into the experiment folder: the console stays out.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    # ---- Tune events (driver side) ----
    def on_trial_start(self, iteration, trials, trial, **info):
        self.running[trial.trial_id] = len(_member_ids(trial))
        self._changed = True
        self.draw()

    def on_trial_complete(self, iteration, trials, trial, **info):
        for rec in member_results(trial.last_result, _member_ids(trial)).values():
            status = rec[STATUS_KEY]
            self.counts[status if status in self.counts else "failed"] += 1
            if status == "finished" and self.metric and isinstance(rec.get(self.metric), (int, float)):
                value = float(rec[self.metric])
                self.best = value if self.best is None else max(self.best, value)
        self._settle(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.counts["failed"] += len(_member_ids(trial))
        self._settle(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial errored (a killed worker, a lost node) and Tune starts it again (resources.max_failures).
        self.retries += 1
        self._changed = True
        self.draw()

    def on_step_end(self, iteration, trials, **info):
        self.draw()

    def on_experiment_end(self, trials, **info):
        self.close()

    def _settle(self, trial) -> None:
        self.running.pop(trial.trial_id, None)
        self._changed = True
        self.draw()

    # ---- the line ----
    def line(self) -> str:
        done = {s: self.prior.get(s, 0) + n for s, n in self.counts.items()}
        elapsed = time.monotonic() - self.started
        finished_now = sum(self.counts.values())
        left = max(0, self.total - sum(done.values()))
        if left == 0:
            eta = "0:00"
        elif finished_now:
            # Throughput so far in this run (trials already running in parallel count in it).
            eta = _clock(elapsed / finished_now * left)
        else:
            eta = "?"
        text = (f"[{self.stage}] {done['finished']}/{self.total} finished, {sum(self.running.values())} running, "
                f"{done['failed']} failed, {done['pruned']} pruned"
                f"{f', {self.retries} retr' + ('y' if self.retries == 1 else 'ies') if self.retries else ''}"
                f" · {_clock(elapsed)} elapsed · ETA {eta}")
        if self.metric:
            text += f" · best {self.metric} " + ("-" if self.best is None else f"{self.best:.2f}")
        return text

    def draw(self, force: bool = False) -> None:
        if self.console is None:
            return
        now = time.monotonic()
        since = now - self._last_draw
        if self.live:
            if not force and since < 1.0:
                return
            text = self.line()
            pad = max(0, len(self._last_text) - len(text))
            self._write("\r" + text + " " * pad)
        else:
            if not force and not (self._changed and since >= self.every) and since < 5 * self.every:
                return
            text = self.line()
            if text == self._last_text and not force:
                self._last_draw = now
                return
            self._write(text + "\n")
        self._last_text, self._last_draw, self._changed = text, now, False

    def close(self) -> None:
        """The last state of the line, then a newline on a terminal; idempotent."""
        if self.console is None:
            return
        if self.live:
            self.draw(force=True)
            self._write("\n")
        elif self._changed:
            self.draw(force=True)
        self.console = None

    def _write(self, text: str) -> None:
        try:
            self.console.write(text)
            self.console.flush()
        except (OSError, ValueError):  # a closed console must not fail the stage
            self.console = None


def _member_ids(trial) -> list[str]:
    return [m["trial_id"] for m in (trial.config.get("group") or {}).get("members", [])]


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
