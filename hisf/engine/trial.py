"""One trial from a frozen TrialConfig to final metrics: build, the epoch loop, evaluation per protocol, finish."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from hisf.config import ConfigError, TrialConfig
from hisf.engine import checkpoint as ckpt
from hisf.engine.atomic import atomic_write_text
from hisf.engine.callbacks import StopTrial, TrialCallback, call, listeners
from hisf.engine.distributed import (DistEnv, any_rank, barrier, broadcast_params, check_device,
                                     gather_cuda_rng_states, init_from_env, shutdown)
from hisf.engine.evaluation import accuracy, evaluate_protocol
from hisf.engine.export import PROMPTS_FILE, export_prompts
from hisf.engine.optim import build_optimizer, build_scheduler
from hisf.engine.progress import LossMeter, Progress
from hisf.engine.step import (CudaGraphSkips, NanGuard, Precision, compile_losses, compile_stats, deterministic_mode,
                              loss_terms, release_compiled, resolve_precision, seed_everything, train_step)
from hisf.engine.trial_data import DataError, TrialData, check_labels, open_trial_data
from hisf.model.backbone import BackboneError, load_backbone
from hisf.model.prompts import PromptError

__all__ = ["INPUT_ERRORS", "StopTrial", "TrialCallback", "free_trial_memory", "run_trial"]

log = logging.getLogger("hisf.engine")

# What bad input raises (config, data, backbone, prompt sizes), before or while a trial starts: the same every
# time, so a caller reports it as one line (`hisf-bench train`) rather than a traceback.
INPUT_ERRORS = (ConfigError, DataError, BackboneError, PromptError)


def run_trial(cfg: TrialConfig, callbacks: Sequence[TrialCallback] = (), resume: bool = True) -> dict[str, float]:
    """Train and evaluate one trial; returns the final metrics (docs/interfaces.md) on every rank."""
    if not isinstance(cfg, TrialConfig):
        raise TypeError(f"run_trial: expected a TrialConfig, got {type(cfg).__name__}")
    cfg.validate()
    # Entered before the device is chosen: in a fresh process CUBLAS_WORKSPACE_CONFIG is then set before CUDA starts.
    with deterministic_mode(cfg.train.deterministic):
        env = init_from_env(cfg.device)
        try:
            return _run(cfg, list(callbacks), resume, env)
        finally:
            free_trial_memory(env, compiled=cfg.train.compile)
            shutdown(env)


def free_trial_memory(env: DistEnv, compiled: bool) -> None:
    """Give a finished trial's device memory back before the process (a reused Tune actor) runs the next one.

    A compiled model sits in a reference cycle (compile_losses) and Dynamo's caches hold its graphs: drop
    those, collect the cycle, then return the freed blocks to the driver so a co-located trial can use them.
    """
    if compiled:
        release_compiled(None)
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Trial:
    """A built trial: what it runs with (config, ranks, data, model, precision) and its TrialState."""

    cfg: TrialConfig
    env: DistEnv
    callbacks: list[TrialCallback]
    data: TrialData
    precision: Precision
    state: ckpt.TrialState
    identity: ckpt.ResumeIdentity
    params: list[torch.nn.Parameter]  # the optimiser's: all-reduced every step, broadcast from rank 0
    epochs: int  # 0 when nothing is trainable
    guard: NanGuard
    device_name: str
    eager_fallbacks: int = 0  # Dynamo's process-wide count before this trial (train.compile)
    steps_per_epoch: int = 0

    @property
    def model(self) -> Any:
        return self.state.model

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def _run(cfg: TrialConfig, callbacks: list[TrialCallback], resume: bool, env: DistEnv) -> dict[str, float]:
    t = _build(cfg, listeners(callbacks, env.is_main), env)
    resumed = resume and ckpt.resume(t.out_dir, t.state, t.identity, t.data.train.classnames, env.rank, env.device)
    broadcast_params(t.params, env)
    t.steps_per_epoch = len(t.data.train_loader(epoch=0)) if t.epochs else 0
    _log_start(t, resumed)
    stopped = False
    for epoch in range(t.state.epoch, t.epochs):
        metrics, stopped = _train_epoch(t, epoch)
        stopped = stopped or _end_epoch(t, epoch, metrics)
        if stopped:
            break
    _warn_eager_fallbacks(t)
    return _finish(t, stopped)


def _build(cfg: TrialConfig, callbacks: list[TrialCallback], env: DistEnv) -> Trial:
    """Open the data (every data error is raised here, before the model), then build the model and its optimiser."""
    from hisf.model.methods import build_method  # imports open_clip: only where a trial runs

    tc = cfg.train
    device_name = check_device(env.device)  # an assigned GPU torch cannot use fails here, not as a slow CPU trial
    precision = resolve_precision(tc.precision, env.device)
    data = open_trial_data(cfg, env)
    call(callbacks, "on_trial_start", {**data.describe(), "precision": precision.name,
                                       "compile": tc.compile_mode if tc.compile else "eager", "device_name": device_name})
    seed_everything(cfg.seed)
    backbone = load_backbone(_backbone_storage(cfg, precision))
    model = build_method(cfg.method, backbone, data.train.classnames, template=data.template,
                         dataset=cfg.data.dataset).to(env.device)
    data.bind(backbone, cfg)
    for what, subset in (("data.dataset train", data.train), ("data.dataset val", data.val)):
        check_labels(subset, len(model.classnames), what)
    fallbacks = 0
    if tc.compile:
        release_compiled(None)  # a fresh Dynamo cache per trial: earlier trials' class sets never count here
        compile_losses(model, tc.compile_mode)
        fallbacks = compile_stats()["eager_fallbacks"]
    epochs = tc.epochs if model.num_trainable() else 0
    optimizer = build_optimizer(tc, model.param_groups()) if epochs else None
    state = ckpt.TrialState(model, optimizer, build_scheduler(optimizer, tc) if optimizer else None, precision.scaler)
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
    return Trial(cfg=cfg, env=env, callbacks=callbacks, data=data, precision=precision, state=state,
                 identity=ckpt.ResumeIdentity.of(cfg, env.world_size, data.fingerprints), params=params, epochs=epochs,
                 guard=NanGuard(tc.max_nonfinite_steps), device_name=device_name, eager_fallbacks=fallbacks)


def _log_start(t: Trial, resumed: bool) -> None:
    if t.env.is_main:
        cfg = t.cfg
        log.info("trial %s: %s on %s (%s) on %s, %d trainable params, %d rank(s) x batch %d, %d steps/epoch, %s%s",
                 t.out_dir, cfg.method.name, cfg.data.dataset, cfg.protocol, t.device_name, t.model.num_trainable(),
                 t.env.world_size, cfg.train.batch_size, t.steps_per_epoch, t.precision.name,
                 f"; resuming from epoch {t.state.epoch}/{t.epochs} ({ckpt.checkpoint_path(t.out_dir)})" if resumed else "")


def _train_epoch(t: Trial, epoch: int) -> tuple[dict[str, float], bool]:
    """One pass over the epoch's training batches: (the epoch's metrics, whether a callback stopped the trial)."""
    s, env = t.state, t.env
    t0 = time.perf_counter()
    meter, lr, stopped = LossMeter(loss_terms(t.model)), s.optimizer.param_groups[0]["lr"], False
    progress = Progress(t.cfg.train, t.env, t.callbacks, epoch, t.epochs, t.steps_per_epoch, lr)
    tc = t.cfg.train
    # CUDA graphs asked for: the first step compiles the graphs, and says whether Inductor kept CUDA graphs.
    graphs = CudaGraphSkips() if tc.compile and tc.compile_mode == "reduce-overhead" and s.global_step == 0 else None
    for images, labels in t.data.train_loader(epoch=epoch):
        # Pinned batches on CUDA (TrialData): the copies overlap the previous step's kernels.
        with graphs if graphs is not None else contextlib.nullcontext():
            res = train_step(t.model, images.to(env.device, non_blocking=True),
                             labels.to(env.device, non_blocking=True), s.optimizer, t.precision, t.params, env)
        if graphs is not None:
            if (line := graphs.report(env.device, tc.deterministic)) and env.is_main:
                log.warning(line)
            graphs = None
        s.global_step += 1
        s.skipped_steps += int(res.skipped)
        meter.add(res.losses)
        t.guard.update(res.finite, s.global_step, res.losses)
        if stopped := progress.step(s.global_step, s.skipped_steps, res.losses):
            break
    s.scheduler.step()
    s.train_seconds += time.perf_counter() - t0
    return {**meter.means(), "lr": lr, "epoch": epoch, "skipped_steps": s.skipped_steps}, stopped


def _end_epoch(t: Trial, epoch: int, metrics: dict[str, float]) -> bool:
    """Validate (when asked), checkpoint the state, tell the callbacks; True when one stopped the trial."""
    s, env = t.state, t.env
    if t.cfg.train.validate_every_epoch:
        t0 = time.perf_counter()
        metrics["val_acc"] = accuracy(t.model, t.data.val_loader(), env, t.precision.autocast)
        if getattr(t.model, "forward_writes_params", False):
            # HiCroPL `mapping: released` rewrites its prompts at every forward, and ranks evaluate different
            # numbers of batches: rank 0's values go to every rank so training continues in lockstep.
            broadcast_params(t.params, env)
        s.eval_seconds += time.perf_counter() - t0
    s.history.append(metrics)
    s.epoch = epoch + 1
    cuda_rng = gather_cuda_rng_states(env)  # every rank's own device state (a collective)
    if env.is_main:
        ckpt.save_checkpoint(t.out_dir, s, t.identity, t.data.train.classnames, cuda_rng)
        log.info("epoch %d/%d done: %s", epoch + 1, t.epochs, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    barrier(env)
    checkpoint_dir = str(ckpt.checkpoint_path(t.out_dir).parent)
    return any_rank(call(t.callbacks, "on_epoch_end", epoch, dict(metrics), checkpoint_dir), env)


def _finish(t: Trial, stopped: bool) -> dict[str, float]:
    """Final evaluation per protocol, exported prompts, config.yaml and metrics.json (a stopped trial skips them)."""
    s, env, cfg = t.state, t.env, t.cfg
    last = dict(s.history[-1]) if s.history else {}
    common = {"train_seconds": s.train_seconds, "trainable_params": t.model.num_trainable(),
              "skipped_steps": s.skipped_steps}
    if stopped:
        return {k: float(v) for k, v in {**last, **common, "eval_seconds": s.eval_seconds, "stopped": 1}.items()}
    artifacts: dict[str, str] = {}
    if env.is_main:
        # Exported before evaluation switches the class set (novel or target class names).
        artifacts["prompts"] = str(export_prompts(t.out_dir / PROMPTS_FILE, t.model.trainable_state_dict(), cfg,
                                                  t.data.train.classnames))
    t0 = time.perf_counter()
    final = {"val_acc": last["val_acc"] if "val_acc" in last else
             accuracy(t.model, t.data.val_loader(), env, t.precision.autocast)}
    final.update(evaluate_protocol(t.model, t.data, env, t.precision.autocast))
    eval_seconds = s.eval_seconds + time.perf_counter() - t0
    result = {k: float(v) for k, v in {**last, **final, **common, "eval_seconds": eval_seconds}.items()}
    if env.is_main:
        import yaml

        artifacts["config"] = str(t.out_dir / "config.yaml")
        atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), artifacts["config"])
        artifacts["metrics"] = str(t.out_dir / "metrics.json")
        atomic_write_text(json.dumps({"final": result, "epochs": s.history}, indent=2), artifacts["metrics"])
        log.info("trial done in %.1fs train + %.1fs eval: %s", s.train_seconds, eval_seconds,
                 " ".join(f"{k} {v:.4g}" for k, v in final.items()))
    # Artifacts are written on rank 0 only: other ranks' all_ranks callbacks get an empty dict.
    call(t.callbacks, "on_trial_end", dict(result), dict(artifacts))
    barrier(env)
    return result


def _backbone_storage(cfg: TrialConfig, precision: Precision):
    """The backbone config to load: as configured, except a backbone stored in fp16 under the CPU's bf16
    fallback for `precision: fp16`, which is stored in bf16 to match (no GradScaler guards fp16 gradients
    there; TrialConfig.validate refuses fp16 storage with bf16/fp32 precision outright)."""
    if cfg.backbone.precision == "fp16" and precision.name != "fp16":
        log.warning("backbone.precision fp16 with train.precision fp16 on %s, which runs %s without a GradScaler: "
                    "storing the backbone in %s instead", precision.device_type, precision.name, precision.name)
        return dataclasses.replace(cfg.backbone, precision=precision.name)
    return cfg.backbone


def _warn_eager_fallbacks(t: Trial) -> None:
    if t.cfg.train.compile and t.epochs:
        fallbacks = compile_stats()["eager_fallbacks"] - t.eager_fallbacks
        if fallbacks:
            log.warning("torch.compile fell back to eager for %d frame(s) in this trial (Dynamo's recompile limit): "
                        "the step timings mix compiled and eager steps", fallbacks)
