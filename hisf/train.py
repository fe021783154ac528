"""Command line for one trial, or a fused group of them (docs/fusion.md): `hisf-bench train CONFIG.yaml [MORE.yaml ...]`
and `torchrun -m hisf.train CONFIG.yaml ...`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from hisf.config import ConfigError, TrialConfig, replace_path

EPILOG = """Results go to output_dir (default `runs/trial`, relative to the current folder): checkpoint/ (the
training state, after every epoch), prompts.pt, config.yaml, metrics.json and eval/ (per-class accuracy and the
confusion matrix of each evaluated split: <split>.json, <split>.png). A rerun with the same output_dir
resumes from checkpoint/ only when it is the same run (config, ranks x batch size, the data's builds);
otherwise it stops and says what differs. Several configs train as one fused group (one process, one forward of the
backbone per step; they may differ only in seed, loss weights, learning-rate settings, epochs and output_dir), each
with its own output_dir and results, equal to running it alone. Example: experiments/trial.yaml."""


def _parse_set(item: str) -> tuple[str, object]:
    import yaml

    from hisf.yaml_io import load_yaml, yaml_error

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
    try:
        return key, load_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {yaml_error(e)}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hisf-bench train", description="Run one trial from a TrialConfig YAML file (several: "
                                "one fused group).", epilog=EPILOG)
    p.add_argument("config", nargs="+", help="trial config YAML (TrialConfig keys: protocol, seed, backbone, method, data, "
                                             "train, output_dir, device, evaluate_test; see experiments/trial.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--output-dir", help="override output_dir (default runs/trial)")
    p.add_argument("--fresh", "--no-resume", dest="fresh", action="store_true",
                   help="start from epoch 0: deletes OUTPUT_DIR/checkpoint/ (the saved training state, nothing else) "
                        "instead of resuming from it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config, every default filled in, as YAML, and exit")
    return p


def load_configs(args: argparse.Namespace) -> list[TrialConfig]:
    """Every CONFIG with the --set overrides (and --output-dir, one config only), validated; several form one group."""
    if args.output_dir and len(args.config) > 1:
        raise ConfigError(f"--output-dir: one output folder for {len(args.config)} configs; set output_dir in each")
    cfgs = []
    for path in args.config:
        cfg = TrialConfig.from_yaml(path)
        for item in args.overrides:
            key, value = _parse_set(item)
            cfg = replace_path(cfg, key, value)
        if args.output_dir:
            cfg = replace_path(cfg, "output_dir", args.output_dir)
        cfgs.append(cfg.validate())
    if len(cfgs) > 1:
        from hisf.engine.group import check_group

        check_group(cfgs)
    return cfgs


def resolved_yaml(cfg: TrialConfig) -> str:
    """The config as YAML with every key, and what each null stands for when the trial runs."""
    import yaml

    from hisf.model.facts import METHODS
    from hisf.presets import PRESETS

    m, t, preset = cfg.method, cfg.train, PRESETS[cfg.train.preset]
    nulls = [f"method.n_ctx -> {METHODS[m.name].n_ctx} ({m.name}'s default)" if m.n_ctx is None else "",
             f"train.lr -> {preset.lr:g} (preset {preset.name})" if t.lr is None else "",
             f"train.weight_decay -> {preset.weight_decay:g} (preset {preset.name})" if t.weight_decay is None else "",
             "backbone.cache_dir -> open_clip's own caches" if cfg.backbone.cache_dir is None else ""]
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    nulls = [n for n in nulls if n]
    return text + (f"# null: {'; '.join(nulls)}\n" if nulls else "")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfgs = load_configs(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print("---\n".join(resolved_yaml(cfg) for cfg in cfgs), end="")
        return 0

    from hisf.engine import INPUT_ERRORS, run_group
    from hisf.engine.checkpoint import clear_checkpoint

    where = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        if args.fresh and local_rank == 0:
            # Every rank runs with resume=False, so none reads the folder while one node's rank 0 deletes it.
            for cfg in cfgs:
                cleared = clear_checkpoint(cfg.output_dir)
                if cleared is not None:
                    logging.getLogger("hisf.train").info("--fresh: deleted %s", cleared)
        outcomes = run_group(cfgs, resume=not args.fresh)
    except INPUT_ERRORS as e:
        return _error(e, where, args.fresh)
    failed = [_error(o, where, args.fresh) for o in outcomes if isinstance(o, BaseException)]
    if rank == 0:
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        if len(cfgs) == 1 and results:
            print(json.dumps(results[0], indent=2, sort_keys=True))
        elif results:
            print(json.dumps({c.output_dir: o for c, o in zip(cfgs, outcomes) if not isinstance(o, BaseException)},
                             indent=2, sort_keys=True))
    return max(failed, default=0)


def _error(e: BaseException, where: str, fresh: bool) -> int:
    """Print what ended a trial as one line; the exit status: 2 for bad input, 1 for a diverged trial."""
    from hisf.engine import INPUT_ERRORS, NonFiniteLossError
    from hisf.engine.checkpoint import ResumeError

    if isinstance(e, ResumeError):
        hint = "" if fresh else (f"\nto start this trial afresh rerun with --fresh (deletes {e.path.parent}, the "
                                 "saved training state only), or give another --output-dir")
        print(f"{where}error: {e}{hint}", file=sys.stderr)
        return 2
    if isinstance(e, INPUT_ERRORS):
        print(f"{where}error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, NonFiniteLossError):
        print(f"{where}error: {e}", file=sys.stderr)
        return 1
    raise e


if __name__ == "__main__":
    sys.exit(main())
