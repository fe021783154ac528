"""Optuna's RDB storage as the orchestrator opens it: driver URL, engine settings, and retried calls."""

from __future__ import annotations

import functools
import importlib.util

import optuna

from orchestrator.store_retry import retry

# BaseStorage's calls (RDBStorage implements them): each one is one retried unit. Internal helpers are not
# wrapped, so a call is retried whole, never half of it.
RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial", "get_trial_params",
    "get_trial_user_attrs", "get_trial_system_attrs", "record_heartbeat",
)


def sqlalchemy_url(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy; the project installs psycopg (3), so say so when only it is
    there (the URL a user copies from PostgreSQL's docs then just works)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg2") is None \
                and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # SQLite's busy timeout: a writer waits up to 60 s for the file lock before "database is locked".
        return {"connect_args": {"timeout": 60}}
    # pool_pre_ping: a pooled connection that a database restart dropped is replaced before use, not failed on.
    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres")):
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def _retried(name: str):
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return retry(lambda: method(self, *args, **kwargs), f"Optuna {name}")

    return call


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose calls retry transient database errors (orchestrator.store_retry) with backoff."""

    def __init__(self, url: str, **kwargs):
        retry(lambda: super(RetryingRDBStorage, self).__init__(url, **kwargs), "Optuna storage open")

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        blinked = []

        def once():
            try:
                return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                # A first attempt that committed before its answer was lost: the trial already holds this state.
                if blinked and optuna.storages.RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return retry(once, "Optuna set_trial_state_values", on_retry=blinked.append)


for _name in RETRIED:
    setattr(RetryingRDBStorage, _name, _retried(_name))


def open_storage(url: str) -> RetryingRDBStorage:
    url = sqlalchemy_url(url)
    return RetryingRDBStorage(url, engine_kwargs=engine_kwargs(url))
