"""Ray on the driver: the session (a cluster at `--address`, or a small local Ray), a stage's Tuner (resources,
failure and checkpoint configs, callbacks) and its results read back through the result protocol."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.context import Options
from orchestrator.disk import DiskFull, StopOnDiskFull
from orchestrator.results import ERROR_KEY, member_results
from orchestrator.spec import ExperimentSpec, SpecError
from orchestrator.trials import trial_resources


def worker_env() -> dict[str, str]:
    """The environment every Ray worker process starts with (runtime_env env_vars)."""
    repo = str(Path(__file__).resolve().parent.parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            # cuBLAS reads it once, at a process's first CUDA matmul: a reused worker that trains a
            # `train.deterministic` trial after another can only have it from its start. :4096:8 is PyTorch's
            # own default workspace on H100/H200 (more than its default elsewhere), so other trials lose nothing.
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}


@contextlib.contextmanager
def ray_session(spec: ExperimentSpec, opts: Options):
    """Connect to `--address`, or start a small local Ray on 127.0.0.1 only (orchestrator/local_ray.py) and stop
    it afterwards (or, should this process be killed, its watchdog does)."""
    import ray

    # num_to_keep=1 forces a state snapshot per checkpoint; that is intended, the warning about it is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        yield
        return
    env = worker_env()
    if opts.address:
        connect(opts, env)
        try:
            yield
        finally:
            # Disconnect (the cluster runs on): a driver left connected prints the workers' last, deduplicated
            # log lines ("Checkpoint successfully created ... [repeated 15x]") over the console when it exits.
            ray.shutdown()
        return
    from orchestrator.local_ray import local_ray

    r = spec.resources
    # A DDP trial also holds a sliver of a CPU while its workers run (trials.trial_resources).
    waiting = 0.01 * r.max_concurrent_trials if r.workers_per_trial > 1 else 0.0
    need = max(1, math.ceil(r.cpus_per_trial * r.workers_per_trial * r.max_concurrent_trials + waiting))
    with local_ray(opts.num_cpus or need, env, Path(opts.workdir) / "logs" / "ray-watchdog.log"):
        yield


class ClusterError(SpecError):
    """The cluster at `--address` cannot be used; the message names the fix."""


def connect(opts: Options, env: dict[str, str]) -> None:
    """Connect to the cluster at `--address`, Ray's own output (its retries print a line a second) to
    `<workdir>/logs/ray-connect.log`; a refused token or no cluster there is one ClusterError naming the fix."""
    import ray

    from orchestrator.progress import ray_output_to_log

    log = Path(opts.workdir) / "logs" / "ray-connect.log"
    try:
        with ray_output_to_log(opts.out, log, opts.verbose):
            ray.init(address=opts.address, runtime_env={"env_vars": env}, log_to_driver=True)
    except Exception as e:
        text = _chain_text(e)
        where = f"--address {opts.address}"
        if "InvalidAuthToken" in text or "AuthenticationError" in text:
            mode = os.environ.get("RAY_AUTH_MODE", "")
            if mode != "token":
                raise ClusterError(
                    f"{where}: the cluster uses token authentication and this driver sent no token (RAY_AUTH_MODE is "
                    f"{mode or 'unset'}): `export RAY_AUTH_MODE=token` with the cluster's token in ~/.ray/auth_token "
                    "or in the file RAY_AUTH_TOKEN_PATH names (on the head node: `ray get-auth-token`), then run "
                    f"again (Ray's output: {log})") from None
            raise ClusterError(
                f"{where}: the cluster refused this driver's token ({os.environ.get('RAY_AUTH_TOKEN_PATH') or '~/.ray/auth_token'}):"
                f" copy the head node's token there (`ray get-auth-token` on the head node) (Ray's output: {log})") from None
        if isinstance(e, (ConnectionError, RuntimeError)) and ("GCS" in text or "connect" in text.lower()):
            raise ClusterError(f"{where}: no Ray cluster answers there ({text.strip().splitlines()[-1][:300]}); start "
                               f"one (`ray start --head`) or pass its address (Ray's output: {log})") from None
        raise


def _chain_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def tuner(spec: ExperimentSpec, opts: Options, name: str, progress, param_space: dict | None = None,
          searcher=None):
    """The stage's Tuner over `param_space` (a grid of group payloads, orchestrator/groups.py) or, with `searcher`,
    the groups it suggests; one Tune trial per group."""
    from ray import tune

    from orchestrator.resume import DropFinishedCheckpoints
    from orchestrator.trainable import tune_trainable

    def trial_name(t):
        return t.config["group"]["group_id"]

    storage = str(Path(opts.workdir) / "ray_results")
    tune_config = tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials,
                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name, reuse_actors=True)
    if searcher is not None:
        tune_config.search_alg = searcher
        tune_config.num_samples = -1
    callbacks = [progress] + ([] if spec.resources.keep_checkpoints else [DropFinishedCheckpoints(storage)])
    disk = StopOnDiskFull()
    run_config = tune.RunConfig(
        name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0, callbacks=callbacks, stop=disk)
    return StageTuner(tune.Tuner(tune.with_resources(tune_trainable, trial_resources(spec)), param_space=param_space,
                                 tune_config=tune_config, run_config=run_config), disk)


@dataclass
class StageTuner:
    """A stage's Tuner and the stopper that ends it on a full disk (`fit` raises DiskFull then)."""

    tuner: Any
    disk: StopOnDiskFull

    def fit(self):
        return self.tuner.fit()


class Interrupted(Exception):
    """Ctrl-C (SIGINT) ended a stage's Tuner early: Tune stopped its trials and saved its state."""


def fit(stage_tuner):
    """`stage_tuner.fit()`, where a first Ctrl-C asks Tune to stop (its trials stopped, its state saved) and then
    raises Interrupted, and a second one stops at once (KeyboardInterrupt).

    Tune's own SIGINT handler would end the run just as quietly, returning a result grid in which every trial
    it cut short reads as failed; ours asks Tune through its other stop signal (its SIGUSR1 handler) and
    remembers that the stage was interrupted."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return stage_tuner.fit()
    state = {"interrupted": False}

    def on_sigint(signum, frame):
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["interrupted"] = True
        tune_stop = signal.getsignal(signal.SIGUSR1)  # installed by Tune while it runs
        if not callable(tune_stop):
            raise KeyboardInterrupt
        tune_stop(signum, frame)

    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    saved_handler = signal.signal(signal.SIGINT, on_sigint)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        grid = stage_tuner.fit()
    finally:
        signal.signal(signal.SIGINT, saved_handler)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env
    if state["interrupted"]:
        raise Interrupted()
    if getattr(stage_tuner, "disk", None) is not None and stage_tuner.disk.message:
        raise DiskFull(stage_tuner.disk.message)
    return grid


def collect(grid) -> dict[str, dict]:
    """member trial id -> its final record (status, error, metrics) from a fitted Tuner's groups; every member of a
    Tune trial that errored (retries used up) or did not end by itself failed."""
    out = {}
    for res in grid:
        group = (res.config or {}).get("group") or {}
        ids = [m["trial_id"] for m in group.get("members", [])]
        for tid, rec in member_results(None if res.error is not None else res.metrics, ids).items():
            error = str(res.error) if res.error is not None else rec.get(ERROR_KEY)
            out[tid] = {**rec, "trial_id": tid, "error": error}
    return out
