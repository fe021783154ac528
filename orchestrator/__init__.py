"""Runs many trials: specs, Ray Tune scheduling, MLflow tracking, Optuna search, reports, CLI."""
