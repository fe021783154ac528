"""Store writes that outlive a blink: which errors are transient, and a bounded, logged exponential backoff.

MLflow (SQLite, a database, or an `mlflow server`) and Optuna (RDB storage) calls go through `retry`: a
locked SQLite file, an `mlflow server` being restarted, a PostgreSQL restart (dropped connections, "the
database system is starting up") are waited out, each retry logged; anything else is raised at once. The
budget, `HISF_STORE_RETRY_SECONDS` (default 180 s), bounds the wait: past it the error is raised, the trial
fails and Tune retries it (`max_failures`), or `--resume` picks it up.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable

log = logging.getLogger("hisf.stores")
BUDGET_ENV = "HISF_STORE_RETRY_SECONDS"
DEFAULT_BUDGET = 180.0
FIRST_DELAY, MAX_DELAY = 0.25, 8.0

# Lower-cased fragments of the messages a store gives while it is busy or briefly away.
TRANSIENT = (
    "database is locked", "database table is locked",  # SQLite under concurrent writers
    "connection refused", "connection reset", "connection aborted", "broken pipe", "remotedisconnected",
    "max retries exceeded", "failed to establish a new connection", "read timed out", "connect timeout",
    # an `mlflow server` (503 while its database is away) or a proxy in front of it
    "error code 429", "error code 502", "error code 503", "error code 504",
    "too many 429 error", "too many 502 error", "too many 503 error", "too many 504 error",
    "server closed the connection", "terminating connection", "could not connect to server",
    "connection failed", "consuming input failed", "the database system is starting up",
    "the database system is shutting down", "the database system is in recovery mode",
    "no connection to the server", "connection is closed", "connection timed out", "ssl syscall error",
    "too many connections", "deadlock detected", "could not serialize access",
)
_inside = threading.local()


def budget() -> float:
    try:
        return max(0.0, float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET)))
    except ValueError:
        return DEFAULT_BUDGET


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _transient_cause(e: BaseException) -> BaseException | None:
    """The error in e's chain that says the store is busy or away, or None when none does."""
    for err in _chain(e):
        if isinstance(err, (ConnectionError, TimeoutError)):
            return err
        if any(cls.__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout") for cls in type(err).__mro__):
            return err  # requests' and urllib3's
        if getattr(err, "connection_invalidated", False):  # sqlalchemy.exc.DBAPIError on a dropped connection
            return err
        text = str(err).lower()
        if any(t in text for t in TRANSIENT):
            return err
    return None


def is_transient(e: BaseException) -> bool:
    return _transient_cause(e) is not None


def _first_line(e: BaseException) -> str:
    # Optuna wraps database errors in a generic StorageInternalError: name the cause that says what happened.
    e = _transient_cause(e) or e
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def retry(fn: Callable[[], Any], what: str, on_retry: Callable[[BaseException], Any] | None = None) -> Any:
    """fn(), retried on transient store errors with exponential backoff (jittered, capped at MAX_DELAY s)
    until the budget is spent; each retry is logged. Nested calls run once: the outermost one retries."""
    if getattr(_inside, "active", False):
        return fn()
    _inside.active = True
    try:
        start, attempt = time.monotonic(), 0
        limit = budget()
        while True:
            try:
                return fn()
            except Exception as e:
                elapsed = time.monotonic() - start
                delay = min(MAX_DELAY, FIRST_DELAY * 2 ** attempt) * random.uniform(0.8, 1.2)
                if not is_transient(e) or elapsed + delay > limit:
                    if attempt and is_transient(e):
                        log.error("hisf-bench: %s still failing after %d retries over %.0fs (budget %s=%.0f): %s",
                                  what, attempt, elapsed, BUDGET_ENV, limit, _first_line(e))
                    raise
                attempt += 1
                log.warning("hisf-bench: %s: store unavailable (%s); retry %d in %.1fs (%.0fs of %.0fs)",
                            what, _first_line(e), attempt, delay, elapsed, limit)
                time.sleep(delay)
                if on_retry is not None:
                    on_retry(e)
    finally:
        _inside.active = False


def quiet_mlflow_http_retries() -> None:
    """MLflow's own HTTP client retries connection errors for ~4 minutes, silently, and resends a POST whose
    answer was lost (a duplicate run): set it to fail fast so `retry` (logged, bounded, idempotent where
    it matters) is the one place that waits. A user's own setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
