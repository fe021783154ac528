"""How members that trained all their epochs finish, together: final evaluation per protocol in one pass over the
shared test sets, exported prompts, config.yaml, metrics.json, per-class results (eval/) and `on_trial_end`, each in
its own folder."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hisf.engine.atomic import atomic_write_text
from hisf.class_results import EVAL_DIR, write_class_results
from hisf.engine.distributed import DistEnv, barrier
from hisf.engine.evaluation import SplitScores, protocol_metrics, score, score_protocol
from hisf.engine.export import PROMPTS_FILE, export_prompts
from hisf.engine.member import Member

log = logging.getLogger("hisf.engine")


def finish_members(model: Any, members: list[Member], done: list[Member], env: DistEnv, precision: Any) -> None:
    """Finish `done` (members of `members`, the model's member axis): each gets its `result` and its files."""
    import yaml

    artifacts: dict[int, dict[str, str]] = {id(m): {} for m in done}
    if env.is_main:
        for m in done:
            # Exported before evaluation switches the class set (novel or target class names).
            artifacts[id(m)]["prompts"] = str(export_prompts(m.out_dir / PROMPTS_FILE,
                                                             model.trainable_state_dict(m.state.member), m.cfg,
                                                             m.data.train.classnames, m.data.template))
    # Before evaluation switches the class set (HISF's label embeddings then hold the novel or target classes).
    totals = {id(m): m.totals() for m in done}
    t0 = time.perf_counter()
    # The last epoch's validation counts serve; a member without them (no per-epoch validation, nothing trained,
    # or resumed after its last epoch) is validated here.
    unvalidated = [m for m in done if m.val_confusion is None]
    val = None
    if unvalidated:
        loaders = [m.data.val_loader() if m in unvalidated else None for m in members]
        val = score(model, loaders, env, precision.autocast, shared=False, metric="val_acc")
    splits = score_protocol(model, members[0].data, env, precision.autocast)
    finals = protocol_metrics(splits, len(members))
    seconds = time.perf_counter() - t0
    for m in done:
        s, k = m.state, m.state.member
        last = dict(s.history[-1]) if s.history else {}
        val_confusion = m.val_confusion if m.val_confusion is not None else val.confusion[k]
        val_acc = last.get("val_acc", val.accuracy()[k] if val is not None else None)
        final = {"val_acc": val_acc, **finals[k]}
        result = {key: float(v) for key, v in {**last, **final, **totals[id(m)],
                                                "eval_seconds": s.eval_seconds + seconds}.items()}
        if env.is_main:
            files = artifacts[id(m)]
            files["config"] = str(m.out_dir / "config.yaml")
            atomic_write_text(yaml.safe_dump(m.cfg.to_dict(), sort_keys=False), files["config"])
            files["metrics"] = str(m.out_dir / "metrics.json")
            atomic_write_text(json.dumps({"final": result, "epochs": s.history}, indent=2), files["metrics"])
            files[EVAL_DIR] = str(_write_eval(m, k, val_confusion, splits))
            log.info("trial %s done in %.1fs train + %.1fs eval: %s", m.out_dir, s.train_seconds, result["eval_seconds"],
                     " ".join(f"{key} {v:.4g}" for key, v in final.items()))
        m.result = result
        # Artifacts are written on rank 0 only: other ranks' all_ranks callbacks get an empty dict.
        m.call("on_trial_end", dict(result), dict(artifacts[id(m)]))
    barrier(env)


def _write_eval(m: Member, k: int, val_confusion: Any, splits: list[SplitScores]):
    """Member k's per-class results of validation (its training classes) and every test split, in `output_dir/eval/`."""
    write_class_results(m.out_dir, val_confusion, m.data.val.classnames, "val_acc", m.cfg.data.dataset)
    for split in splits:
        write_class_results(m.out_dir, split.confusion[k], split.classnames, split.metric, split.dataset)
    return m.out_dir / EVAL_DIR
