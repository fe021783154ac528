"""Trials from frozen TrialConfigs to final metrics: a group of members (docs/fusion.md; one trial is a group of one)
built, trained epoch by epoch over one forward of the frozen backbone, evaluated per protocol, each member finishing
on its own."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Sequence

import torch

from hisf.config import ConfigError, TrialConfig
from hisf.engine import checkpoint as ckpt
from hisf.engine.build import Group, build_group
from hisf.engine.callbacks import GroupCallback, TrialCallback, listeners
from hisf.engine.distributed import (DistEnv, any_rank_each, barrier, broadcast_params, gather_cuda_rng_states,
                                     init_from_env, shutdown)
from hisf.engine.evaluation import score
from hisf.engine.finish import finish_members
from hisf.engine.group import check_group
from hisf.engine.member import FAILED, STOPPED, TRAINING
from hisf.engine.step import (CudaGraphSkips, NonFiniteLossError, compile_stats, deterministic_mode, release_compiled,
                              train_step)
from hisf.engine.trial_data import DataError
from hisf.model.backbone import BackboneError
from hisf.model.prompts import PromptError

__all__ = ["INPUT_ERRORS", "free_trial_memory", "run_group", "run_trial"]

log = logging.getLogger("hisf.engine")

# What bad input raises (config, data, backbone, prompt sizes), before or while a trial starts: the same every
# time, so a caller reports it as one line (`hisf-bench train`) rather than a traceback.
INPUT_ERRORS = (ConfigError, DataError, BackboneError, PromptError)


def run_trial(cfg: TrialConfig, callbacks: Sequence[TrialCallback] = (), resume: bool = True) -> dict[str, float]:
    """Train and evaluate one trial; returns the final metrics (docs/interfaces.md) on every rank."""
    (outcome,) = run_group([cfg], [callbacks], resume)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_group(cfgs: Sequence[TrialConfig], callbacks: Sequence[Sequence[TrialCallback]] | None = None,
              resume: bool = True, group_callbacks: Sequence[GroupCallback] = ()) -> list[dict[str, float] | BaseException]:
    """Train and evaluate `cfgs` as one fused group (hisf.engine.group: they may differ only in MEMBER_KEYS);
    `callbacks[i]` are member i's, `group_callbacks` the group's (GroupCallback).

    Returns, per member, its final metrics or the error that ended it alone (its NaN guard, its callbacks); the
    other members go on. An error of the group itself (data, device, memory) raises: every member's checkpoint of
    its last finished epoch stays, so a rerun resumes each one."""
    for cfg in cfgs:
        if not isinstance(cfg, TrialConfig):
            raise TypeError(f"run_group: expected TrialConfigs, got {type(cfg).__name__}")
        cfg.validate()
    check_group(cfgs)
    callbacks = [list(c) for c in (callbacks if callbacks is not None else [()] * len(cfgs))]
    # Entered before the device is chosen: in a fresh process CUBLAS_WORKSPACE_CONFIG is then set before CUDA starts.
    with deterministic_mode(cfgs[0].train.deterministic):
        env = init_from_env(cfgs[0].device)
        try:
            return _run(list(cfgs), callbacks, resume, env, list(group_callbacks))
        finally:
            free_trial_memory(env, compiled=cfgs[0].train.compile)
            shutdown(env)


def free_trial_memory(env: DistEnv, compiled: bool) -> None:
    """Give a finished group's device memory back before the process (a reused Tune actor) runs the next one.

    A compiled model sits in a reference cycle (compile_losses) and Dynamo's caches hold its graphs: drop
    those, collect the cycle, then return the freed blocks to the driver so a co-located trial can use them.
    """
    if compiled:
        release_compiled(None)
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


def _run(cfgs: list[TrialConfig], callbacks: list[list[TrialCallback]], resume: bool, env: DistEnv,
         group_callbacks: list[GroupCallback]) -> list:
    g = build_group(cfgs, callbacks, env)
    g.group_callbacks = listeners(group_callbacks, env.is_main)
    for m in g.members:
        m.resumed = resume and ckpt.resume(m.out_dir, m.state, m.identity, m.data.train.classnames, env.rank,
                                           env.device)
    broadcast_params(g.stacked(), env)
    _log_start(g)
    while True:
        _leave(g)
        if not g.members:
            break
        _train_epoch(g)
        _end_epoch(g)
    _warn_eager_fallbacks(g)
    return [m.result for m in g.everyone]


def _log_start(g: Group) -> None:
    if not g.env.is_main:
        return
    for m in g.members:
        cfg = m.cfg
        log.info("trial %s: %s on %s (%s) on %s, %d trainable params, %d rank(s) x batch %d, %d steps/epoch, %s%s%s",
                 m.out_dir, cfg.method.name, cfg.data.dataset, cfg.protocol, g.device_name, g.model.num_trainable(),
                 g.env.world_size, cfg.train.batch_size, g.steps_per_epoch, g.precision.name,
                 f", member {m.state.member + 1} of a group of {len(g.members)}" if len(g.members) > 1 else "",
                 f"; resuming from epoch {m.state.epoch}/{m.epochs} ({ckpt.checkpoint_path(m.out_dir)})"
                 if m.resumed else "")


def _train_epoch(g: Group) -> None:
    """One pass over every member's next epoch of training batches (each member at its own epoch), in one step each."""
    env, members = g.env, g.members
    t0 = time.perf_counter()
    for i, m in enumerate(members):
        m.start_epoch(g.steps_per_epoch, env, log_line=i == 0, members=len(members))
    loaders = [m.data.train_loader(epoch=m.state.epoch) for m in members]
    tc = members[0].cfg.train
    # CUDA graphs asked for: the first step compiles the graphs, and says whether Inductor kept CUDA graphs.
    graphs = CudaGraphSkips() if tc.compile and tc.compile_mode == "reduce-overhead" and not g.stepped else None
    for batches in zip(*loaders):
        training = [m for m in members if m.outcome == TRAINING]
        if not training:
            break
        # Pinned batches on CUDA (TrialData): the copies overlap the previous step's kernels.
        images = torch.cat([b[0] for b in batches]).to(env.device, non_blocking=True)
        labels = torch.stack([b[1] for b in batches]).to(env.device, non_blocking=True)
        with graphs if graphs is not None else contextlib.nullcontext():
            results = train_step(g.model, images, labels, [m.state for m in training], g.precision, env)
        if graphs is not None:
            if (line := graphs.report(env.device, tc.deterministic)) and env.is_main:
                log.warning(line)
            graphs = None
        g.stepped = True
        reported, stops = False, []
        for m, res in zip(training, results):
            s = m.state
            s.global_step += 1
            s.skipped_steps += int(res.skipped)
            m.meter.add(res.losses)
            try:
                m.guard.update(res.finite, s.global_step, res.losses)
            except NonFiniteLossError as e:
                m.fail(e)
            logged, stop = m.progress.step(s.global_step, s.skipped_steps, res.losses)
            reported, stops = reported or logged, stops + [stop or m.outcome == FAILED]
        if reported:  # every rank reaches the same reporting steps: one collective agrees the members' stops
            for m, stop in zip(training, any_rank_each(stops, env)):
                if stop and m.outcome == TRAINING:
                    m.outcome = STOPPED
    seconds = time.perf_counter() - t0
    for m in members:
        m.state.scheduler.step()
        m.state.train_seconds += seconds
        m.epoch_metrics = {**m.meter.means(), **m.epoch_metrics, "skipped_steps": m.state.skipped_steps}


def _end_epoch(g: Group) -> None:
    """Validate (fused), checkpoint each member, tell each member's callbacks; a stop asked there ends that member."""
    env = g.env
    finishing = [m for m in g.members if m.outcome == TRAINING]
    if not finishing:
        return
    if finishing[0].cfg.train.validate_every_epoch:
        t0 = time.perf_counter()
        loaders = [m.data.val_loader() if m.outcome == TRAINING else None for m in g.members]
        scores = score(g.model, loaders, env, g.precision.autocast, shared=False, metric="val_acc",
                       dataset=finishing[0].cfg.data.dataset)
        accs = scores.accuracy()
        if getattr(g.model, "forward_writes_params", False):
            # HiCroPL `mapping: released` rewrites its prompts at every forward, and ranks evaluate different
            # numbers of batches: rank 0's values go to every rank so training continues in lockstep.
            broadcast_params(g.stacked(), env)
        for m in finishing:
            m.epoch_metrics["val_acc"] = accs[m.state.member]
            # Kept for the member's per-class validation results, should this epoch be its last (finish.py).
            m.val_confusion = scores.confusion[m.state.member].clone()
            m.state.eval_seconds += time.perf_counter() - t0
    for m in finishing:
        m.state.history.append(dict(m.epoch_metrics))
        m.state.epoch += 1
    cuda_rng = gather_cuda_rng_states(env)  # every rank's own device state (a collective)
    if env.is_main:
        for m in finishing:
            ckpt.save_checkpoint(m.out_dir, m.state, m.identity, m.data.train.classnames, cuda_rng)
            log.info("%sepoch %d/%d done: %s", f"{m.out_dir.name}: " if len(g.members) > 1 else "", m.state.epoch,
                     m.epochs, " ".join(f"{k} {v:.4g}" for k, v in m.epoch_metrics.items()))
    barrier(env)
    checkpoint_dirs = [str(ckpt.checkpoint_path(m.out_dir).parent) for m in finishing]
    stops = [m.call("on_epoch_end", m.state.epoch - 1, dict(m.epoch_metrics), d) or m.outcome == FAILED
             for m, d in zip(finishing, checkpoint_dirs)]
    for m, stop in zip(finishing, any_rank_each(stops, env)):
        if stop and m.outcome == TRAINING:
            m.outcome = STOPPED
    records = [{"member": g.everyone.index(m), "epoch": m.state.epoch - 1, "metrics": dict(m.epoch_metrics),
                "checkpoint_dir": d, "stopped": m.outcome != TRAINING} for m, d in zip(finishing, checkpoint_dirs)]
    for cb in g.group_callbacks:
        cb.on_epoch_end(records)


def _leave(g: Group) -> None:
    """Members done, stopped or failed leave: the done ones finish together (final evaluation, exports), the group
    re-packs around the rest, each carrying its optimiser state over to its new place."""
    leaving = [m for m in g.members if m.leaving]
    if not leaving:
        return
    for m in leaving:
        if m.outcome == STOPPED:
            m.result = m.stopped_result()
    done = [m for m in leaving if m.done]
    if done:
        finish_members(g.model, g.members, done, g.env, g.precision)
    stay = [m for m in g.members if not m.leaving]
    if stay and done:
        # Final evaluation switched the class set (novel classes, targets): training continues on its own.
        first = stay[0]
        g.model.set_classnames(first.data.train.classnames, template=first.data.template, dataset=first.cfg.data.dataset)
    if stay:
        saved = [m.state.state_dict() for m in stay]
        g.model.keep_members([m.state.member for m in stay])
        for i, (m, before) in enumerate(zip(stay, saved)):
            m.bind(g.model, i, g.precision, m.state.scaler)
            m.state.load_state_dict(before)
    g.members = stay


def _warn_eager_fallbacks(g: Group) -> None:
    if g.everyone[0].cfg.train.compile and any(m.epochs for m in g.everyone):
        fallbacks = compile_stats()["eager_fallbacks"] - g.eager_fallbacks
        if fallbacks:
            log.warning("torch.compile fell back to eager for %d frame(s) in this trial (Dynamo's recompile limit): "
                        "the step timings mix compiled and eager steps", fallbacks)
