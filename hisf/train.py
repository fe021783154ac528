"""Command line for one trial: `hisf-bench train CONFIG.yaml` and `torchrun -m hisf.train CONFIG.yaml`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from hisf.config import ConfigError, TrialConfig, replace_path


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hisf-bench train", description="Run one trial from a TrialConfig YAML file.")
    parser.add_argument("config", help="trial config YAML (TrialConfig keys: protocol, seed, backbone, method, data, train, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one dotted key, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = TrialConfig.from_yaml(args.config)
        for item in args.overrides:
            key, value = _parse_set(item)
            cfg = replace_path(cfg, key, value)
        if args.output_dir:
            cfg = replace_path(cfg, "output_dir", args.output_dir)
        cfg.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from hisf.engine import run_trial

    try:
        result = run_trial(cfg, resume=not args.no_resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
