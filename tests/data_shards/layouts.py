"""Writers for tiny source datasets in the layouts users have on disk (CoOp, CLIP_benchmark, images)."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

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


class _FileList:
    """What CLIP_benchmark's converter takes: a map-style dataset of (image file path, label) with `.classes`
    and `.templates` attributes (it writes classnames.txt and the templates file from them)."""

    def __init__(self, items: list[tuple[str, int]], classes: list[str], templates: list[str]):
        self.items, self.classes, self.templates = items, classes, templates

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def convert_with_clip_benchmark(out: Path, classes: list[str], per_split: dict[str, int], size=(20, 14),
                                 fmt: str = "png", seed0: int = 0) -> dict[str, list[tuple[Path, int]]]:
    """A dataset written by LAION CLIP_benchmark's own converter (pip clip_benchmark,
    `webdataset_builder.convert_dataset`) from image files, `per_split[s]` images per class; returns the
    source files per split in the converter's sample order (labels cycle over the classes)."""
    from clip_benchmark.webdataset_builder import convert_dataset, path_to_bytes

    src, n, files = out.parent / f"{out.name}_src", seed0, {}
    for split, k in per_split.items():
        items = []
        for j in range(k * len(classes)):
            label = j % len(classes)
            path = make_image(src / split / f"{n:05d}.{fmt}", n, size)
            items.append((str(path), label))
            n += 1
        ds = _FileList(items, classes, ["a photo of a {c}.", "a sketch of a {c}."])
        with warnings.catch_warnings():  # its DataLoader asks for 8 workers on any machine
            warnings.simplefilter("ignore", UserWarning)
            convert_dataset(ds, split, str(out), transform=path_to_bytes, verbose=False)
        files[split] = [(Path(p), y) for p, y in items]
    return files
