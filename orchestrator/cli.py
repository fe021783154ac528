"""The `hisf-bench` command line: one entry point dispatching to each package's own commands."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        from data_shards.cli import main as data_main

        return data_main(argv[1:]) or 0
    if argv[:1] == ["train"]:
        from hisf.train import main as train_main

        return train_main(argv[1:]) or 0
    print("usage: hisf-bench {data,train} ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
