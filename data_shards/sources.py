"""Readers of the on-disk layouts users already have (CoOp's DATA/ folders, ImageFolder, CLIP_benchmark WebDataset)."""

from __future__ import annotations

import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One source image: where its bytes are (a file, or a byte range inside a tar) and its label."""

    split: str
    path: str  # original path as the user knows it (file path, or `shard.tar:member`)
    label: int
    classname: str
    src: str  # file to read bytes from
    offset: int = -1  # >= 0: bytes are src[offset:offset+size] (a member of a source tar)
    size: int = -1

    def read_bytes(self) -> bytes:
        with open(self.src, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise DataError(f"{self.src}: truncated tar, member {self.path} needs {self.size} bytes at {self.offset}")
        return data


@dataclass
class Listing:
    """What a source layout holds: class names by label, prompt template(s), and the records of each split."""

    classnames: tuple[str, ...]
    template: str
    splits: dict[str, list[Record]]
    templates: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    return path


def list_images(folder: Path) -> list[Path]:
    """Images directly in `folder`, sorted by name so every machine lists them in the same order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def check_files_exist(records: list[Record], where: Path) -> None:
    missing = [r.src for r in records if r.offset < 0 and not os.path.isfile(r.src)]
    if missing:
        shown = ", ".join(missing[:5])
        raise DataError(f"{where}: {len(missing)} listed image file(s) not found, e.g. {shown}")


def read_split_json(split_file: Path, image_dir: Path, renames: dict[str, str] | None = None) -> tuple[tuple[str, ...], dict[str, list[Record]]]:
    """CoOp's `split_zhou_*.json`: {"train": [[relpath, label, classname], ...], "val": ..., "test": ...}."""
    require_dir(image_dir, "image")
    require_file(split_file, "split")
    try:
        data = json.loads(split_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{split_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "train" not in data or "test" not in data:
        raise DataError(f"{split_file}: expected a JSON object with 'train', 'val' and 'test' lists")
    names: dict[int, str] = {}
    splits: dict[str, list[Record]] = {}
    for split in SPLITS:
        if split not in data:
            continue
        items = data[split]
        if not isinstance(items, list):
            raise DataError(f"{split_file}: '{split}' should be a list of [relpath, label, classname]")
        out = []
        for i, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and isinstance(item[1], int) and not isinstance(item[1], bool) and isinstance(item[2], str)):
                raise DataError(f"{split_file}: {split}[{i}] = {item!r}; expected [relpath, integer label, classname]")
            rel, label, name = item
            if renames:
                name = renames.get(name, name)
            if split == "train":
                if names.setdefault(label, name) != name:
                    raise DataError(f"{split_file}: label {label} is named both {names[label]!r} and {name!r}")
            elif label not in names or names[label] != name:
                raise DataError(f"{split_file}: {split}[{i}] has class ({label}, {name!r}) that the train class list lacks")
            out.append(Record(split, rel, label, name, str(image_dir / rel)))
        splits[split] = out
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{split_file}: train labels should be 0..{len(names) - 1}, got {sorted(names)[:10]}...")
    for recs in splits.values():
        check_files_exist(recs, split_file)
    return tuple(names[i] for i in range(len(names))), splits


def read_fgvc(dataset_dir: Path) -> tuple[tuple[str, ...], dict[str, list[Record]]]:
    """FGVCAircraft: variants.txt (class list) and images_variant_{train,val,test}.txt (`imname variant`)."""
    require_dir(dataset_dir, "FGVCAircraft dataset")
    image_dir = require_dir(dataset_dir / "images", "image")
    vfile = require_file(dataset_dir / "variants.txt", "class list")
    classnames = [l.strip() for l in vfile.read_text().splitlines() if l.strip()]
    index = {n: i for i, n in enumerate(classnames)}
    splits = {}
    for split in SPLITS:
        sfile = require_file(dataset_dir / f"images_variant_{split}.txt", "split")
        recs = []
        for n, line in enumerate(sfile.read_text().splitlines(), 1):
            if not line.strip():
                continue
            imname, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"{sfile}:{n}: variant {variant!r} is not in {vfile}")
            recs.append(Record(split, f"{imname}.jpg", index[variant], variant, str(image_dir / f"{imname}.jpg")))
        check_files_exist(recs, sfile)
        splits[split] = recs
    return tuple(classnames), splits


def read_wnid_names(candidates: list[Path]) -> dict[str, str] | None:
    """ImageNet's `classnames.txt` (`n01440764 tench` per line), from the first candidate that exists."""
    for path in candidates:
        if path.is_file():
            out = {}
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                wnid, _, name = line.strip().partition(" ")
                if not name:
                    raise DataError(f"{path}:{n}: expected 'wnid class name', got {line!r}")
                out[wnid] = name
            return out
    return None


def shipped_imagenet_names() -> list[str]:
    path = Path(__file__).parent / "classnames" / "imagenet.txt"
    return [l for l in path.read_text().splitlines() if l]


def read_class_folders(split_dir: Path, split: str, classes: list[str], names: list[str]) -> list[Record]:
    """Images under split_dir/<class folder>/, labelled by the folder's index in `classes`."""
    index = {c: i for i, c in enumerate(classes)}
    recs = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise DataError(f"{folder}: class folder {folder.name!r} is not in the class list of {split_dir.parent}")
        label = index[folder.name]
        for img in list_images(folder):
            recs.append(Record(split, str(img.relative_to(split_dir)), label, names[label], str(img)))
    return recs


def read_imagenet(dataset_dir: Path) -> tuple[tuple[str, ...], dict[str, list[Record]]]:
    """ImageNet: images/{train,val}/<wnid>/ with classnames.txt; train feeds few-shot, val is the test split."""
    image_dir = require_dir(dataset_dir / "images", "ImageNet image")
    train_dir = require_dir(image_dir / "train", "ImageNet train")
    val_dir = require_dir(image_dir / "val", "ImageNet val")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    table = read_wnid_names([dataset_dir / "classnames.txt"])
    if table is None:
        shipped = shipped_imagenet_names()
        if len(wnids) != len(shipped):
            raise DataError(f"{dataset_dir / 'classnames.txt'}: file not found (needed unless {train_dir} has all 1000 class folders)")
        table = dict(zip(wnids, shipped))
    missing = [w for w in wnids if w not in table]
    if missing:
        raise DataError(f"{dataset_dir / 'classnames.txt'}: lacks class folder(s) {missing[:5]} of {train_dir}")
    names = [table[w] for w in wnids]
    # No val split is built: validation is drawn at selection time from the train items the K-shot draw
    # left (data_shards.dataset), so the K-shot draw itself sees CoOp's whole train list.
    train = read_class_folders(train_dir, "train", wnids, names)
    test = read_class_folders(val_dir, "test", wnids, names)
    return tuple(names), {"train": train, "test": test}


def read_imagenet_variant(image_dir: Path, data_root: Path, numbered: bool) -> tuple[tuple[str, ...], dict[str, list[Record]]]:
    """ImageNet-V2 (folders 0..999) or -Sketch/-A/-R (wnid folders; A and R hold a 200-class subset,
    labelled by their sorted order as CoOp does)."""
    require_dir(image_dir, "image")
    variant_dir = image_dir.parent if numbered else image_dir
    candidates = [variant_dir / "classnames.txt", image_dir.parent / "classnames.txt", data_root / "imagenet" / "classnames.txt"]
    table = read_wnid_names(candidates)
    folders = sorted((p.name for p in image_dir.iterdir() if p.is_dir()), key=(lambda s: int(s)) if numbered else None)
    if numbered:
        all_names = list(table.values()) if table is not None else shipped_imagenet_names()
        bad = [f for f in folders if not f.isdigit() or int(f) >= len(all_names)]
        if bad:
            raise DataError(f"{image_dir}: class folders {bad[:5]} are not label numbers 0..{len(all_names) - 1}")
        classes, names = [str(i) for i in range(len(all_names))], all_names
    else:
        if table is None:
            raise DataError(f"classnames.txt not found in any of {[str(c) for c in candidates]}")
        missing = [f for f in folders if f not in table]
        if missing:
            raise DataError(f"{image_dir}: class folder(s) {missing[:5]} are not in classnames.txt")
        classes, names = folders, [table[f] for f in folders]
    return tuple(names), {"test": read_class_folders(image_dir, "test", classes, names)}


# How read_image_folder splits a flat folder; `data build` and `data info` print it (docs/protocols.md).
FLAT_SPLIT = ("a flat folder (ROOT/<class>/) is split per class into 50% train, 20% val, 30% test (Dassl's "
              "read_and_split_data), shuffled with a seed made of the folder and class names")


def read_image_folder(root: Path) -> tuple[tuple[str, ...], dict[str, list[Record]], str]:
    """A folder of class sub-folders, either split (root/{train,val,test}/<class>/) or flat (root/<class>/),
    split flat ones per class as Dassl's read_and_split_data does (50% train, 20% val, 30% test).
    Returns (class names, records per split, how the splits were made: FLAT_SPLIT, or "" for split folders)."""
    require_dir(root, "image folder")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs:
        classes = sorted({p.name for d in split_dirs.values() for p in d.iterdir() if p.is_dir()})
        names = [c.replace("_", " ") for c in classes]
        splits = {s: read_class_folders(d, s, classes, names) for s, d in split_dirs.items()}
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{root}: expected class sub-folders (or train/val/test folders of them), found none")
        names = [c.replace("_", " ") for c in classes]
        splits = {s: [] for s in SPLITS}
        for label, c in enumerate(classes):
            images = list_images(root / c)
            random.Random(f"{root.name}:{c}").shuffle(images)
            n_train, n_val = round(len(images) * 0.5), round(len(images) * 0.2)
            for i, img in enumerate(images):
                split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
                splits[split].append(Record(split, str(img.relative_to(root)), label, names[label], str(img)))
        return tuple(names), splits, FLAT_SPLIT
    return tuple(names), splits, ""


def _clip_benchmark_split(split_dir: Path, split: str, classnames: list[str]) -> list[Record]:
    nfile = require_file(split_dir / "nshards.txt", "nshards")
    try:
        nshards = int(nfile.read_text().strip())
    except ValueError:
        raise DataError(f"{nfile}: expected an integer shard count, got {nfile.read_text().strip()!r}") from None
    recs = []
    for i in range(nshards):
        tar_path = require_file(split_dir / f"{i}.tar", "shard")
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar_path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    key, _, ext = base.partition(".")
                    s = samples.setdefault(key, {})
                    if ext == "cls":
                        s["cls"] = tf.extractfile(m).read().decode().strip()
                    elif "." + ext.lower() in IMAGE_EXTS:
                        s["img"] = (m.name, m.offset_data, m.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{tar_path}: unreadable or truncated tar ({e})") from None
        size = tar_path.stat().st_size
        for key, s in samples.items():
            if "img" not in s or "cls" not in s:
                raise DataError(f"{tar_path}: sample {key!r} lacks an image (webp/png/jpg) or a 'cls' entry")
            name, off, n = s["img"]
            if off + n > size:
                raise DataError(f"{tar_path}: truncated tar, member {name} ends past the end of the file")
            try:
                label = int(s["cls"])
            except ValueError:
                raise DataError(f"{tar_path}: sample {key!r} has cls {s['cls']!r}; expected an integer") from None
            if not 0 <= label < len(classnames):
                raise DataError(f"{tar_path}: sample {key!r} has class {label} that classnames.txt ({len(classnames)} classes) lacks")
            recs.append(Record(split, f"{split_dir.name}/{i}.tar:{name}", label, classnames[label], str(tar_path), off, n))
    return recs


def read_clip_benchmark(root: Path) -> tuple[tuple[str, ...], dict[str, list[Record]], tuple[str, ...]]:
    """LAION CLIP_benchmark's WebDataset layout: classnames.txt, zeroshot_classification_templates.txt,
    <split>/nshards.txt and <split>/0.tar .. {N-1}.tar with samples `sNNNNNNN.{webp,png,jpg,cls}`."""
    require_dir(root, "CLIP_benchmark dataset")
    cfile = require_file(root / "classnames.txt", "class list")
    classnames = [l.strip() for l in cfile.read_text().splitlines() if l.strip()]
    tfile = root / "zeroshot_classification_templates.txt"
    templates = tuple(l.strip().replace("{c}", "{}") for l in tfile.read_text().splitlines() if l.strip()) if tfile.is_file() else ()
    aliases = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
    splits = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "nshards.txt").exists()):
        if d.name not in aliases:
            raise DataError(f"{d}: unknown split folder; expected one of {sorted(aliases)}")
        splits[aliases[d.name]] = _clip_benchmark_split(d, aliases[d.name], classnames)
    if not splits:
        raise DataError(f"{root}: no split folder with nshards.txt found (expected e.g. test/nshards.txt)")
    return tuple(classnames), splits, templates
