"""Fixtures for orchestrator tests: demo shards built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import build_demo_shards


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Real demo images (data_shards.demo: 6 classes, 16/4/8 per class) built into shards at 32 px:
    DATA/demo/manifest.parquet."""
    return build_demo_shards(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once (the migrations take seconds); tests copy it."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db
