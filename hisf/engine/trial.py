"""The trial engine: one trial from a frozen TrialConfig to final metrics (DDP, mixed precision, resume, callbacks)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from hisf.config import TrialConfig
from hisf.engine import checkpoint as ckpt
from hisf.engine.distributed import (DistEnv, any_rank, barrier, broadcast_params, check_device,
                                     gather_cuda_rng_states, init_from_env, shutdown)
from hisf.engine.evaluation import accuracy
from hisf.engine.optim import build_optimizer, build_scheduler
from hisf.engine.step import (CudaGraphSkips, NanGuard, Precision, compile_losses, compile_stats, deterministic_mode,
                              loss_terms, release_compiled, resolve_precision, seed_everything, train_step)
from hisf.engine.trial_data import TrialData, check_labels, evaluate_protocol, open_trial_data

log = logging.getLogger("hisf.engine")


class StopTrial(Exception):
    """Raised by a callback (e.g. an Optuna pruner) to end the trial cleanly after the current step or epoch."""


class TrialCallback:
    """Listener interface; every method is optional and called on rank 0 only, unless the callback sets
    `all_ranks = True` (then on every rank, with the same epochs and metrics; e.g. Ray Train's
    `ray.train.report`, which every worker must call the same number of times)."""

    all_ranks: bool = False

    def on_trial_start(self, data: dict) -> None: ...  # TrialData.describe(): image_mode, dataset, ...

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None: ...

    def on_progress(self, step: int, total: int, metrics: dict) -> None: ...

    def on_trial_end(self, metrics: dict, artifacts: dict[str, str]) -> None: ...


# --- the trial -----------------------------------------------------------------------------------------


@dataclass
class _Meter:
    """Epoch means of the model's loss terms (`model.loss_terms`), over the steps with a finite loss."""

    terms: tuple[str, ...]
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        self.sums = {k: 0.0 for k in self.terms}

    def add(self, losses: dict[str, float]) -> None:
        if all(math.isfinite(v) for v in losses.values()):
            self.count += 1
            for k, v in losses.items():
                self.sums[k] += v

    def means(self) -> dict[str, float]:
        return {f"train/{k}": (self.sums[k] / self.count if self.count else float("nan")) for k in self.terms}


def _call(callbacks: Iterable[TrialCallback], hook: str, *args: Any) -> bool:
    """Run one hook on every callback; True when one asked to stop."""
    stop = False
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except StopTrial as e:
            log.info("trial stopped by %s: %s", type(cb).__name__, e)
            stop = True
    return stop


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
class _Counters:
    """What a checkpoint carries besides tensors: the data position (next epoch) and running totals."""

    epoch: int = 0
    history: list = field(default_factory=list)
    skipped_steps: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


def _restore(state: dict, model, optimizer, scheduler, precision: Precision, env: DistEnv) -> _Counters:
    model.load_trainable_state_dict(state["trainable"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if precision.scaler is not None and state["scaler"]:
        precision.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"], env.rank, env.device)
    return _Counters(**{k: state[k] for k in _Counters.__dataclass_fields__})


def _state(cfg: TrialConfig, data: TrialData, model, optimizer, scheduler, precision: Precision, c: _Counters,
           cuda_rng: list | None = None) -> dict:
    return {
        "identity": ckpt.identity(cfg), "classnames": list(data.train.classnames), "trainable": model.trainable_state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": precision.scaler.state_dict() if precision.scaler is not None else {}, "rng": ckpt.rng_state(cuda_rng),
        **dataclasses.asdict(c),
    }


def _run(cfg: TrialConfig, callbacks: list[TrialCallback], resume: bool, env: DistEnv) -> dict[str, float]:
    from hisf.model.backbone import load_backbone
    from hisf.model.methods import build_method

    callbacks = [cb for cb in callbacks if env.is_main or getattr(cb, "all_ranks", False)]
    out_dir, tc = Path(cfg.output_dir), cfg.train
    device_name = check_device(env.device)  # an assigned GPU torch cannot use fails here, not as a slow CPU trial
    precision = resolve_precision(tc.precision, env.device)
    data = open_trial_data(cfg, env)  # every data error is raised here, before the model is built
    _call(callbacks, "on_trial_start", data.describe())
    seed_everything(cfg.seed)
    backbone = load_backbone(_backbone_storage(cfg, precision))
    model = build_method(cfg.method, backbone, data.train.classnames, template=data.template,
                         dataset=cfg.data.dataset).to(env.device)
    data.bind(backbone, cfg)
    for what, subset in (("data.dataset train", data.train), ("data.dataset val", data.val)):
        check_labels(subset, len(model.classnames), what)
    if tc.compile:
        release_compiled(None)  # a fresh Dynamo cache per trial: earlier trials' class sets never count here
        compile_losses(model, tc.compile_mode)
        fallbacks_before = compile_stats()["eager_fallbacks"]
    n_trainable = model.num_trainable()
    epochs = tc.epochs if n_trainable else 0
    optimizer = build_optimizer(tc, model.param_groups()) if epochs else None
    scheduler = build_scheduler(optimizer, tc) if optimizer else None
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
    state = ckpt.load_checkpoint(out_dir, cfg, data.train.classnames) if resume else None
    c = _restore(state, model, optimizer, scheduler, precision, env) if state else _Counters()
    broadcast_params(params, env)
    steps_per_epoch = len(data.train_loader(epoch=0)) if epochs else 0
    total, images_per_step = steps_per_epoch * epochs, tc.batch_size * env.world_size
    guard, stop = NanGuard(tc.max_nonfinite_steps), False
    # CUDA graphs asked for: the first step compiles the graphs, and says whether Inductor kept CUDA graphs.
    graphs = CudaGraphSkips() if tc.compile and tc.compile_mode == "reduce-overhead" and epochs else None
    if env.is_main:
        log.info("trial %s: %s on %s (%s) on %s, %d trainable params, %d rank(s) x batch %d, %d steps/epoch, %s%s",
                 out_dir, cfg.method.name, cfg.data.dataset, cfg.protocol, device_name, n_trainable, env.world_size,
                 tc.batch_size, steps_per_epoch, precision.name, f"; resuming from epoch {c.epoch}/{epochs}" if state else "")

    for epoch in range(c.epoch, epochs):
        t0 = t_log = time.perf_counter()
        meter, lr, since_log = _Meter(loss_terms(model)), optimizer.param_groups[0]["lr"], 0
        for images, labels in data.train_loader(epoch=epoch):
            # Pinned batches on CUDA (TrialData): the copies overlap the previous step's kernels.
            images = images.to(env.device, non_blocking=True)
            with graphs if graphs is not None else contextlib.nullcontext():
                res = train_step(model, images, labels.to(env.device, non_blocking=True), optimizer, precision, params, env)
            if graphs is not None:
                if (line := graphs.report(env.device, tc.deterministic)) and env.is_main:
                    log.warning(line)
                graphs = None
            c.global_step += 1
            c.skipped_steps += int(res.skipped)
            meter.add(res.losses)
            guard.update(res.finite, c.global_step, res.losses)
            since_log += images_per_step
            if tc.log_every and c.global_step % tc.log_every == 0:
                ips = since_log / max(time.perf_counter() - t_log, 1e-9)
                t_log, since_log = time.perf_counter(), 0
                if env.is_main:
                    terms = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in res.losses.items() if k != "loss")
                    log.info("epoch %d/%d step %d/%d loss %.4f (%s) lr %.3g %.1f img/s ETA %s",
                             epoch + 1, epochs, c.global_step, total, res.losses["loss"], terms, lr, ips,
                             _format_eta((total - c.global_step) * images_per_step / max(ips, 1e-9)))
                progress = {**{f"train/{k}": v for k, v in res.losses.items()}, "lr": lr, "images_per_s": ips,
                            "epoch": epoch, "skipped_steps": c.skipped_steps}
                if stop := any_rank(_call(callbacks, "on_progress", c.global_step, total, progress), env):
                    break
        scheduler.step()
        c.train_seconds += time.perf_counter() - t0
        if stop:
            break
        metrics = {**meter.means(), "lr": lr, "epoch": epoch, "skipped_steps": c.skipped_steps}
        if tc.validate_every_epoch:
            t0 = time.perf_counter()
            metrics["val_acc"] = accuracy(model, data.val_loader(), env, precision.autocast)
            if getattr(model, "forward_writes_params", False):
                # HiCroPL `mapping: released` rewrites its prompts at every forward, and ranks evaluate different
                # numbers of batches: rank 0's values go to every rank so training continues in lockstep.
                broadcast_params(params, env)
            c.eval_seconds += time.perf_counter() - t0
        c.history.append(metrics)
        c.epoch = epoch + 1
        cuda_rng = gather_cuda_rng_states(env)  # every rank's own device state (a collective)
        if env.is_main:
            ckpt.save_checkpoint(out_dir, _state(cfg, data, model, optimizer, scheduler, precision, c, cuda_rng))
            log.info("epoch %d/%d done: %s", epoch + 1, epochs, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        barrier(env)
        checkpoint_dir = str(ckpt.checkpoint_path(out_dir).parent)
        if stop := any_rank(_call(callbacks, "on_epoch_end", epoch, dict(metrics), checkpoint_dir), env):
            break

    if tc.compile and epochs:
        fallbacks = compile_stats()["eager_fallbacks"] - fallbacks_before
        if fallbacks:
            log.warning("torch.compile fell back to eager for %d frame(s) in this trial (Dynamo's recompile limit): "
                        "the step timings mix compiled and eager steps", fallbacks)
    return _finish(cfg, data, model, precision, env, callbacks, c, n_trainable, stop)


def _backbone_storage(cfg: TrialConfig, precision: Precision):
    """The backbone config to load: as configured, except a backbone stored in fp16 under the CPU's bf16
    fallback for `precision: fp16`, which is stored in bf16 to match (no GradScaler guards fp16 gradients
    there; TrialConfig.validate refuses fp16 storage with bf16/fp32 precision outright)."""
    if cfg.backbone.precision == "fp16" and precision.name != "fp16":
        log.warning("backbone.precision fp16 with train.precision fp16 on %s, which runs %s without a GradScaler: "
                    "storing the backbone in %s instead", precision.device_type, precision.name, precision.name)
        return dataclasses.replace(cfg.backbone, precision=precision.name)
    return cfg.backbone


def _finish(cfg: TrialConfig, data: TrialData, model, precision: Precision, env: DistEnv,
            callbacks: list[TrialCallback], c: _Counters, n_trainable: int, stopped: bool) -> dict[str, float]:
    """Final evaluation per protocol, exported prompts, config.yaml and metrics.json (a stopped trial skips them)."""
    out_dir = Path(cfg.output_dir)
    last = dict(c.history[-1]) if c.history else {}
    common = {"train_seconds": c.train_seconds, "trainable_params": n_trainable, "skipped_steps": c.skipped_steps}
    if stopped:
        return {k: float(v) for k, v in {**last, **common, "eval_seconds": c.eval_seconds, "stopped": 1}.items()}
    artifacts: dict[str, str] = {}
    if env.is_main:
        # Exported before evaluation switches the class set (novel or target class names).
        artifacts["prompts"] = str(ckpt.export_prompts(out_dir / ckpt.PROMPTS_FILE, model.trainable_state_dict(),
                                                       cfg, data.train.classnames))
    t0 = time.perf_counter()
    final = {"val_acc": last["val_acc"] if "val_acc" in last else accuracy(model, data.val_loader(), env, precision.autocast)}
    final.update(evaluate_protocol(model, data, env, precision.autocast))
    eval_seconds = c.eval_seconds + time.perf_counter() - t0
    result = {k: float(v) for k, v in {**last, **final, **common, "eval_seconds": eval_seconds}.items()}
    if env.is_main:
        import yaml

        artifacts["config"] = str(out_dir / "config.yaml")
        ckpt.atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), artifacts["config"])
        artifacts["metrics"] = str(out_dir / "metrics.json")
        ckpt.atomic_write_text(json.dumps({"final": result, "epochs": c.history}, indent=2), artifacts["metrics"])
        log.info("trial done in %.1fs train + %.1fs eval: %s", c.train_seconds, eval_seconds,
                 " ".join(f"{k} {v:.4g}" for k, v in final.items()))
    # Artifacts are written on rank 0 only: other ranks' all_ranks callbacks get an empty dict.
    _call(callbacks, "on_trial_end", dict(result), dict(artifacts))
    barrier(env)
    return result
