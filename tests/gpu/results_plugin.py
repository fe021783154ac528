"""A pytest plugin for scripts/gpu_check.sh: each test's outcome appended to $HISF_GPU_TESTS_JSONL the moment it is known.

    HISF_GPU_TESTS_JSONL=OUT/tests.jsonl python -m pytest -p tests.gpu.results_plugin tests/gpu -m gpu

JUnit XML is written when the session ends, so a run stopped by its time limit would say nothing; these lines
(one `session` record with the number of selected tests, one `test` record per test, an `end` record with the
exit status) survive the kill (benchmarks/timing.append_jsonl). Nothing here imports torch.
"""

from __future__ import annotations

import os

from benchmarks.timing import append_jsonl

RESULTS_ENV = "HISF_GPU_TESTS_JSONL"


def _record(rec: dict) -> None:
    append_jsonl(os.environ.get(RESULTS_ENV), rec)


def pytest_collection_finish(session) -> None:
    _record({"record": "session", "selected": len(session.items)})


def _message(report) -> str:
    if not report.failed or report.longrepr is None:
        return ""
    crash = getattr(report.longrepr, "reprcrash", None)  # the exception line and where it was raised
    if crash is not None:
        first = crash.message.splitlines()[0] if crash.message else ""
        return f"{first} ({os.path.basename(crash.path)}:{crash.lineno})"[:400]
    lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:400]


def pytest_collectreport(report) -> None:
    # A module that fails to import never reaches a test report: say so (e.g. a package the GPU image lacks).
    if report.failed:
        _record({"record": "test", "test": report.nodeid, "when": "collect", "outcome": "error", "seconds": 0.0,
                 "message": _message(report)})


def pytest_runtest_logreport(report) -> None:
    # The call's outcome, or the setup's/teardown's when that failed (an error) or skipped the test.
    if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed):
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        _record({"record": "test", "test": report.nodeid, "when": report.when, "outcome": outcome,
                 "seconds": round(report.duration, 2), "message": _message(report)})


def pytest_sessionfinish(session, exitstatus) -> None:
    _record({"record": "end", "exitstatus": int(exitstatus)})
