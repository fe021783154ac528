"""Tiny on-disk fixture datasets in every source layout, written as real image files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.builder import BuildOptions, build
from data_shards.demo import write_demo

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_image(seed: int, size=(20, 14)) -> Image.Image:
    """A distinct, smooth random image (smooth so JPEG's chroma subsampling keeps it close to the source)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BILINEAR)


def make_image(path: Path, seed: int, size=(20, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, size).save(path)
    return path


def image_bytes(seed: int, fmt: str = "PNG", size=(20, 14)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def write_coop(data: Path, folder: str, image_sub: str, split_name: str, classes: list[str], per_split=(3, 2, 2)) -> dict:
    """A CoOp dataset folder: images under folder/image_sub/<class>/ and split_zhou_<split_name>.json."""
    dataset_dir = data / folder
    image_dir = dataset_dir / image_sub if image_sub else dataset_dir
    split, n = {"train": [], "val": [], "test": []}, 0
    for label, name in enumerate(classes):
        for s, count in zip(("train", "val", "test"), per_split):
            for _ in range(count):
                rel = f"{name}/img_{n:04d}.jpg"
                make_image(image_dir / rel, n)
                split[s].append([rel, label, name])
                n += 1
    (dataset_dir / f"split_zhou_{split_name}.json").write_text(json.dumps(split))
    return split


def write_clip_benchmark(root: Path, classes: list[str], per_split: dict[str, list[int]], exts=("webp", "png", "jpg")) -> None:
    """CLIP_benchmark's layout; per_split maps split -> samples per shard."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    n = 0
    for split, shard_counts in per_split.items():
        (root / split).mkdir()
        (root / split / "nshards.txt").write_text(str(len(shard_counts)))
        for i, count in enumerate(shard_counts):
            with tarfile.open(root / split / f"{i}.tar", "w") as tf:
                for _ in range(count):
                    ext = exts[n % len(exts)]
                    fmt = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}[ext]
                    for name, data in ((f"s{n:07d}.{ext}", image_bytes(n, fmt)), (f"s{n:07d}.cls", str(n % len(classes)).encode())):
                        ti = tarfile.TarInfo(name)
                        ti.size = len(data)
                        tf.addfile(ti, io.BytesIO(data))
                    n += 1


@pytest.fixture(scope="session")
def demo_built(tmp_path_factory) -> Path:
    """The demo dataset (6 classes; 10/3/7 per class) built at 32 px into small shards that do not divide evenly."""
    base = tmp_path_factory.mktemp("demo")
    write_demo(base / "DATA", n_classes=6, train=10, val=3, test=7, size=40)
    out = base / "built" / "demo"
    build("demo", base / "DATA", out, BuildOptions(image_size=32, shard_size=16384), progress=False)
    return out
