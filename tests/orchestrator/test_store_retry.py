"""Which store errors are retried and how long for (orchestrator.store_retry), on real clients' real errors."""

import logging
import sqlite3

import optuna
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import orchestrator.tracking  # noqa: F401  (sets MLflow's own HTTP retries off, as in every trial)
from orchestrator.optuna_storage import open_storage, sqlalchemy_url
from orchestrator.store_retry import BUDGET_ENV, is_transient, retry
from tests.orchestrator.helpers import free_port


def refused_mlflow_error() -> Exception:
    with pytest.raises(MlflowException) as e:
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_experiment_by_name("x")  # nothing listens there
    return e.value


def test_transient_or_not():
    assert is_transient(refused_mlflow_error())
    assert is_transient(sqlite3.OperationalError("database is locked"))
    with pytest.raises(KeyError) as missing:
        optuna.load_study(study_name="nope", storage=open_storage("sqlite:///:memory:"))
    assert not is_transient(missing.value)
    assert not is_transient(MlflowException("INVALID_PARAMETER_VALUE: Param value 'x' had length 7000"))


def test_retries_are_bounded_and_logged(monkeypatch, caplog):
    # Delays 0.25, 0.5, 1 s, each ±20%: two fit 1.2 s (0.9 s at most, late wake-ups have 0.3 s), a third
    # never does (elapsed >= 0.6 + 0.8). Three attempts whatever the load.
    monkeypatch.setenv(BUDGET_ENV, "1.2")
    err = refused_mlflow_error()
    calls = []

    def always_down():
        calls.append(1)
        raise err

    with caplog.at_level(logging.WARNING, logger="hisf.stores"), pytest.raises(MlflowException):
        retry(always_down, "MLflow test call")
    assert len(calls) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("MLflow test call: store unavailable" in w for w in warnings), warnings
    assert "still failing after 2 retries" in caplog.records[-1].getMessage()


def test_a_blink_is_waited_out_and_other_errors_are_not(caplog):
    err, calls = refused_mlflow_error(), []

    def blinks_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise err
        return "written"

    with caplog.at_level(logging.WARNING, logger="hisf.stores"):
        assert retry(blinks_twice, "MLflow test call") == "written"
    assert len(calls) == 3 and len(caplog.records) == 2
    caplog.clear()
    bad = []
    with pytest.raises(ValueError):
        retry(lambda: bad.append(1) or (_ for _ in ()).throw(ValueError("bad param")), "MLflow test call")
    assert bad == [1] and not caplog.records


def test_nested_calls_retry_once(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "0.5")
    err, inner = refused_mlflow_error(), []

    def inner_call():
        inner.append(1)
        raise err

    with pytest.raises(MlflowException):
        retry(lambda: retry(inner_call, "inner"), "outer")
    # the outer loop retries (0.25 s fits 0.5 s, the next 0.5 s does not); the inner one runs once per attempt
    assert len(inner) == 2


def test_optuna_storage_open_is_retried(monkeypatch, caplog):
    monkeypatch.setenv(BUDGET_ENV, "1.2")
    url = f"postgresql://hisf@127.0.0.1:{free_port()}/optuna"
    assert sqlalchemy_url(url).startswith("postgresql+psycopg://")
    with caplog.at_level(logging.WARNING, logger="hisf.stores"), pytest.raises(Exception) as e:
        open_storage(url)
    assert is_transient(e.value)
    # each attempt itself takes a moment here (an engine, a refused connection): one or two retries fit
    assert 1 <= sum("Optuna storage open: store unavailable" in r.getMessage() for r in caplog.records) <= 2
