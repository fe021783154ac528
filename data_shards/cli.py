"""`hisf-bench data {build,info,demo,list}`: the data pipeline's command line."""

from __future__ import annotations

import argparse
import sys

from data_shards.errors import DataError


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):  # "nanM", "infM"
        raise argparse.ArgumentTypeError(f"expected a size like 256M or 65536, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hisf-bench data")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="convert a dataset on disk into WebDataset shards + manifest.parquet")
    b.add_argument("--dataset", required=True, help="catalogue key, or imagefolder / clip_benchmark (see `hisf-bench data list`)")
    b.add_argument("--root", required=True, help="DATA root (CoOp layout), or the dataset folder for imagefolder/clip_benchmark")
    b.add_argument("--out", required=True, help="output folder, by convention ROOT/<name>")
    b.add_argument("--name", default=None, help="name of an imagefolder / clip_benchmark build, used by specs like a "
                   "catalogue key (default: the --out folder's name)")
    b.add_argument("--exact", action="store_true", help="keep the original image files (no re-encode, no pre-crop); "
                   "loaders apply CoOp's transforms to them: CoOp's exact pixels, slower to load")
    b.add_argument("--image-size", type=int, default=224, help="evaluation size: val/test stored resized + centre-cropped to it")
    b.add_argument("--train-size", type=int, default=None, help="shorter-side cap of stored train images (default 1.5 x image size)")
    b.add_argument("--shard-size", type=_size, default="256M", help="maximum shard size in bytes, K/M/G suffixes allowed")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality of stored images")
    b.add_argument("--jobs", type=int, default=1, help="encoding processes")
    b.add_argument("--skip-bad", action="store_true", help="skip images that fail to decode (listed at the end)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="counts per split and class of a built dataset")
    i.add_argument("path")
    d = sub.add_parser("demo", help="write a small generated dataset in CoOp's layout")
    d.add_argument("--out", required=True, help="DATA root to write demo/ under")
    d.add_argument("--classes", type=int, default=6)
    d.add_argument("--train", type=int, default=16, help="train images per class")
    d.add_argument("--val", type=int, default=4)
    d.add_argument("--test", type=int, default=8)
    d.add_argument("--size", type=int, default=64, help="side of the generated images")
    sub.add_parser("list", help="the dataset catalogue")
    return p


def _info(ds) -> None:
    """Every split the builder wrote; a val split drawn from train at selection time is said to be so."""
    source = "" if ds.source == ds.key else f" ({ds.source})"
    print(f"{ds.key}{source}: {len(ds.classnames)} classes, template {ds.template!r}, {ds.image_mode} images")
    counts, bad = ds.counts(), ds.counts(bad=True)
    for split in ds.splits:
        built = ds.info["splits"].get(split)
        if built is None:  # only val, when the source has none (ds.val_from_train)
            print(f"{split}: none built; drawn from the train items a K-shot draw leaves (min(K, 4) per class)")
            continue
        c, b = counts.get(split, {}), bad.get(split, {})
        left = f", {sum(b.values())} left out (failed to decode)" if b else ""
        print(f"{split}: {sum(c.values())} samples in {len(built['shards'])} shard(s){left}")
        for name in ds.classnames:
            print(f"  {c.get(name, 0):7d}  {name}" + (f"  ({b[name]} left out)" if name in b else ""))
    if ds.info.get("split_rule"):
        print(f"split: {ds.info['split_rule']}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "build":
            from data_shards.builder import BuildOptions, build

            opts = BuildOptions(image_size=args.image_size, train_size=args.train_size, shard_size=args.shard_size,
                                quality=args.quality, jobs=args.jobs, skip_bad=args.skip_bad, exact=args.exact)
            info = build(args.dataset, args.root, args.out, opts, progress=not args.quiet, name=args.name)
            counts = ", ".join(f"{s} {v['count']}" for s, v in info["splits"].items())
            print(f"built {info['key']} ({info['source']}, {info['image_mode']} images) into {args.out}: "
                  f"{len(info['classnames'])} classes, {counts}")
            if info.get("split_rule"):
                print(f"split: {info['split_rule']}")
            if info["skipped"]:
                print(f"{len(info['skipped'])} image(s) failed to decode; they stay in the manifest, flagged, so "
                      "few-shot draws match Dassl's, and are left out when a selection draws them:")
                for s in info["skipped"]:
                    print(f"  {s['path']}: {s['error']}")
        elif args.cmd == "info":
            from data_shards.dataset import open_dataset

            _info(open_dataset(args.path))
        elif args.cmd == "demo":
            from data_shards.demo import write_demo

            out = write_demo(args.out, args.classes, args.train, args.val, args.test, args.size)
            print(f"wrote demo dataset under {out / 'demo'}; build it with "
                  f"`hisf-bench data build --dataset demo --root {out} --out <ROOT>/demo --image-size 32`; "
                  f"class descriptions (HiCroPL's `method.descriptions`) in {out / 'descriptions'}")
        elif args.cmd == "list":
            from data_shards.catalogue import CATALOGUE

            for e in CATALOGUE.values():
                print(f"{e.key:16s} {e.template!r:42s} {e.description}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
