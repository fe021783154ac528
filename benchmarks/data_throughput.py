"""Data pipeline throughput: images/s per loader worker (test shards, augmented train shards) and build speed
against a plain decode + re-encode of the same images.

    PYTHONPATH=. python benchmarks/data_throughput.py --images 600 --size 224 [--exact]

--exact builds in exact mode (original files kept, CoOp's transforms applied at load time) instead of fast mode
(re-encoded copies: test images pre-cropped to --size, train images' shorter side capped at 1.5 x --size).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from PIL import Image

from data_shards import make_loader, open_dataset
from data_shards.builder import BuildOptions, build
from data_shards.demo import write_demo
from data_shards.images import eval_view, resize_shorter

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def write_source(root: Path, n_images: int, side: int) -> list[Path]:
    """Demo-style generated images saved as JPEGs the size of typical benchmark photos (e.g. 500x375)."""
    per_class = max(2, n_images // 6)
    write_demo(root, n_classes=6, train=per_class // 2, val=0, test=per_class - per_class // 2, size=side)
    split = json.loads((root / "demo" / "split_zhou_Demo.json").read_text())
    paths = []
    for s in split.values():
        for item in s:
            png = root / "demo" / "images" / item[0]
            jpg = png.with_suffix(".jpg")
            Image.open(png).convert("RGB").resize((side, side * 3 // 4)).save(jpg, quality=90)
            png.unlink()
            item[0] = str(jpg.relative_to(root / "demo" / "images"))
            paths.append(jpg)
    (root / "demo" / "split_zhou_Demo.json").write_text(json.dumps(split))
    return paths


def plain_reencode(root: Path, opts: BuildOptions) -> float:
    """The reference cost: decode each image, bring it to the size the builder stores for its split (test:
    resize + centre crop; train: shorter side capped), encode it as JPEG, in one process, nothing else."""
    split = json.loads((root / "demo" / "split_zhou_Demo.json").read_text())
    t, n = time.perf_counter(), 0
    for name, items in split.items():
        for rel, _, _ in items:
            img = Image.open(root / "demo" / "images" / rel).convert("RGB")
            if name == "train":
                img = resize_shorter(img, opts.stored_train_size) if min(img.size) > opts.stored_train_size else img
            else:
                img = eval_view(img, opts.image_size)
            img.save(io.BytesIO(), format="JPEG", quality=opts.quality)
            n += 1
    return n / (time.perf_counter() - t)


def loader_rate(sub, train: bool, size: int, batch: int, workers: int, epochs: int = 2) -> float:
    n, t = 0, time.perf_counter()
    for epoch in range(epochs):
        loader = make_loader(sub, train=train, batch_size=batch, image_size=size, mean=CLIP_MEAN, std=CLIP_STD,
                             seed=1, epoch=epoch, num_workers=workers)
        for x, _ in loader:
            n += len(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the result to this file (scripts/gpu_check.sh)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers of the multi-worker rate (0: skip it)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=224, help="evaluation image size")
    ap.add_argument("--source-side", type=int, default=500, help="width of the generated source JPEGs")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--exact", action="store_true", help="exact image mode (`data build --exact`)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        paths = write_source(tmp / "DATA", args.images, args.source_side)
        opts = BuildOptions(image_size=args.size, jobs=args.jobs, exact=args.exact)
        reencode = plain_reencode(tmp / "DATA", opts)
        t = time.perf_counter()
        build("demo", tmp / "DATA", tmp / "demo", opts, progress=False)
        build_rate = len(paths) / (time.perf_counter() - t)
        ds = open_dataset(tmp / "demo")
        test, train = ds.select("test"), ds.select("train")
        result = {
            "images": len(paths), "image_mode": opts.image_mode, "source_side": args.source_side,
            "image_size": args.size, "build_jobs": args.jobs,
            "shard_bytes": sum(f.stat().st_size for f in (tmp / "demo").rglob("*.tar")),
            "plain_decode_reencode_img_s": round(reencode, 1),
            "build_img_s": round(build_rate, 1),
            "build_over_plain_time_ratio": round(reencode / build_rate / args.jobs, 2),
            "eval_img_s_per_worker": round(loader_rate(test, False, args.size, 100, 0), 1),
            "train_aug_img_s_per_worker": round(loader_rate(train, True, args.size, args.train_batch, 0), 1),
        }
        if args.workers:
            result[f"eval_img_s_{args.workers}_workers"] = round(loader_rate(test, False, args.size, 100, args.workers), 1)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "data_throughput", **result}, indent=2))


if __name__ == "__main__":
    main()
