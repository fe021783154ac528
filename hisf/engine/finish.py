"""How members that trained all their epochs finish, together: final evaluation per protocol in one pass over the
shared test sets, exported prompts, config.yaml, metrics.json and `on_trial_end`, each in its own folder."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hisf.engine.atomic import atomic_write_text
from hisf.engine.distributed import DistEnv, barrier
from hisf.engine.evaluation import accuracy, evaluate_protocol
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
                                                             m.data.train.classnames))
    # Before evaluation switches the class set (HISF's label embeddings then hold the novel or target classes).
    totals = {id(m): m.totals() for m in done}
    t0 = time.perf_counter()
    unvalidated = [m for m in done if not (m.state.history and "val_acc" in m.state.history[-1])]
    val = {}
    if unvalidated:
        loaders = [m.data.val_loader() if m in unvalidated else None for m in members]
        val = dict(enumerate(accuracy(model, loaders, env, precision.autocast, shared=False)))
    finals = evaluate_protocol(model, members[0].data, env, precision.autocast)
    seconds = time.perf_counter() - t0
    for m in done:
        s, k = m.state, m.state.member
        last = dict(s.history[-1]) if s.history else {}
        final = {"val_acc": last.get("val_acc", val.get(k)), **finals[k]}
        result = {key: float(v) for key, v in {**last, **final, **totals[id(m)],
                                                "eval_seconds": s.eval_seconds + seconds}.items()}
        if env.is_main:
            files = artifacts[id(m)]
            files["config"] = str(m.out_dir / "config.yaml")
            atomic_write_text(yaml.safe_dump(m.cfg.to_dict(), sort_keys=False), files["config"])
            files["metrics"] = str(m.out_dir / "metrics.json")
            atomic_write_text(json.dumps({"final": result, "epochs": s.history}, indent=2), files["metrics"])
            log.info("trial %s done in %.1fs train + %.1fs eval: %s", m.out_dir, s.train_seconds, result["eval_seconds"],
                     " ".join(f"{key} {v:.4g}" for key, v in final.items()))
        m.result = result
        # Artifacts are written on rank 0 only: other ranks' all_ranks callbacks get an empty dict.
        m.call("on_trial_end", dict(result), dict(artifacts[id(m)]))
    barrier(env)
