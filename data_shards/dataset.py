"""A built dataset opened from its manifest, and the selections (few-shot, base/novel) made from it."""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_shards.errors import DataError

CLASS_CHOICES = ("all", "base", "novel")


class BadImagesLeftOut(UserWarning):
    """A selection drew images that failed to decode at build time (`--skip-bad`) and leaves them out."""


@dataclass(frozen=True)
class Subset:
    """Selected samples of one split: where each one's bytes lie and its (relabelled) label."""

    root: str
    split: str
    classnames: tuple[str, ...]
    keys: tuple[str, ...]
    shards: tuple[str, ...]
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    checksums: tuple[str, ...]
    left_out: int = 0  # drawn items whose image failed to decode at build time (--skip-bad), not loaded

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shard_files(self) -> list[str]:
        """The shards this subset reads (a few-shot subset reads only those holding its samples)."""
        return sorted(set(self.shards))


def base_novel_classes(n: int, classes: str, present=None) -> list[int]:
    """Dassl's subsample_classes: the labels present in the train split, sorted; base = the first
    ceil(m/2) of those m, novel = the rest; "all" keeps all n labels (Dassl returns the data unchanged).
    `present` defaults to 0..n-1 (every class has train items, as in every CoOp split file)."""
    if classes not in CLASS_CHOICES:
        raise DataError(f"classes={classes!r}: expected one of {list(CLASS_CHOICES)}")
    if classes == "all":
        return list(range(n))
    labels = sorted(set(range(n) if present is None else (int(y) for y in present)))
    m = math.ceil(len(labels) / 2)
    return labels[:m] if classes == "base" else labels[m:]


def fewshot_indices(labels: list[int], shots: int, rng: random.Random) -> list[int]:
    """Dassl's generate_fewshot_dataset (repeat=False): per class, in order of first appearance, K items
    drawn without replacement with `random.sample`; a class with fewer than K keeps all of them."""
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    out = []
    for items in by_label.values():
        out.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return out


class BuiltDataset:
    """A dataset folder written by `hisf-bench data build`: info.json, manifest.parquet and shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        info_path = self.path / "info.json"
        man_path = self.path / "manifest.parquet"
        if not info_path.is_file():
            raise DataError(f"{info_path}: not found; is {self.path} a dataset built with `hisf-bench data build`?")
        if not man_path.is_file():
            raise DataError(f"{man_path}: manifest not found")
        self.info = read_info(info_path)
        self.manifest = read_manifest(man_path)
        self.key: str = self.info["key"]  # catalogue key, or the name a generic (imagefolder/clip_benchmark) build got
        self.source: str = self.info.get("source", self.key)
        # "exact": shards hold the original files, loaders apply CoOp's transforms to them; "fast": re-encoded
        # copies (train shorter side capped, test pre-cropped). Builds before format 2 are fast.
        self.image_mode: str = self.info.get("image_mode", "fast")
        self.classnames: tuple[str, ...] = tuple(self.info["classnames"])
        self.template: str = self.info["template"]
        self.templates: tuple[str, ...] = tuple(self.info.get("templates") or (self.template,))
        built = tuple(s for s in ("train", "val", "test") if self.info["splits"].get(s, {}).get("count"))
        # A source without a val split (ImageNet, some folders) gets validation from the train items the
        # K-shot draw did not pick: never the test split, and the K-shot draw still sees the whole train list.
        self.val_from_train = "train" in built and "val" not in built
        self.splits: tuple[str, ...] = tuple(s for s in ("train", "val", "test") if s in built or (s == "val" and self.val_from_train))
        self._check()
        self._columns = {c: self.manifest.column(c).to_pylist() for c in ("key", "split", "shard", "checksum")}
        self._labels = self.manifest.column("label").to_numpy()
        self._offsets = self.manifest.column("offset").to_numpy()
        self._sizes = self.manifest.column("size").to_numpy()
        n_rows = self.manifest.num_rows
        self._bad = (self.manifest.column("bad").to_numpy(zero_copy_only=False).astype(bool)
                     if "bad" in self.manifest.column_names else np.zeros(n_rows, dtype=bool))
        # Dassl's base/novel cut counts the labels of the train list (bad entries too: Dassl keeps them).
        train = np.asarray([s == "train" for s in self._columns["split"]], dtype=bool)
        self._present = sorted({int(y) for y in self._labels[train]}) if train.any() else list(range(len(self.classnames)))

    def _check(self) -> None:
        """The manifest must match its shards: every listed shard present with its recorded size, and
        every sample's byte range inside its shard."""
        man = self.path / "manifest.parquet"
        sizes = {"": 0}  # rows flagged `bad` have no shard and an empty byte range
        for split, s in self.info["splits"].items():
            for name, nbytes in s["shards"].items():
                p = self.path / name
                if not p.is_file():
                    raise DataError(f"{p}: shard listed in {self.path / 'info.json'} is missing")
                if p.stat().st_size != nbytes:
                    raise DataError(f"{p}: shard is {p.stat().st_size} bytes, info.json records {nbytes} (truncated or replaced)")
                sizes[name] = nbytes
            n = pc.sum(pc.equal(self.manifest.column("split"), split)).as_py() or 0
            if n != s["count"]:
                raise DataError(f"{man}: {n} rows for split {split!r}, info.json records {s['count']}")
        for name in pc.unique(self.manifest.column("shard")).to_pylist():
            if name not in sizes:
                raise DataError(f"{man}: rows point at shard {name!r} that info.json does not list")
        no_shard = pc.equal(self.manifest.column("shard"), "")
        flagged = self.manifest.column("bad") if "bad" in self.manifest.column_names else pc.equal(no_shard, False)
        if self.manifest.num_rows and pc.any(pc.not_equal(no_shard, flagged)).as_py():
            raise DataError(f"{man}: rows without a shard must be exactly those flagged `bad` (failed to decode)")
        ends = pc.add(self.manifest.column("offset"), self.manifest.column("size")).to_numpy()
        limits = np.array([sizes[s] for s in self.manifest.column("shard").to_pylist()], dtype=np.int64)
        bad = np.nonzero(ends > limits)[0]
        if len(bad):
            raise DataError(f"{man}: row {int(bad[0])} ({self.manifest.column('key')[int(bad[0])]}) lies past the end of its shard")
        labels = self.manifest.column("label").to_numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise DataError(f"{man}: labels outside 0..{len(self.classnames) - 1}")

    @property
    def fingerprint(self) -> str:
        """What the build holds, as 16 hex digits: the same images (by checksum), splits, labels, class names,
        template and image mode give the same value on any machine, wherever the folder lives. Resume and the
        reuse of finished trials compare it: a rebuilt dataset with other images is another trial's data."""
        import hashlib

        h = hashlib.sha256()
        facts = {k: self.info.get(k) for k in ("key", "source", "image_mode", "classnames", "template", "image_size")}
        h.update(json.dumps(facts, sort_keys=True, default=str).encode())
        for col in ("key", "split", "checksum"):
            h.update("\0".join(self._columns[col]).encode())
        h.update(np.ascontiguousarray(self._labels, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self._bad, dtype=np.bool_).tobytes())
        return h.hexdigest()[:16]

    def counts(self, bad: bool = False) -> dict[str, dict[str, int]]:
        """Loadable samples per split and class name (bad=True: those that failed to decode instead)."""
        out: dict[str, dict[str, int]] = {}
        for split, y, b in zip(self._columns["split"], self._labels, self._bad):
            if bool(b) != bad:
                continue
            d = out.setdefault(split, {})
            d[self.classnames[y]] = d.get(self.classnames[y], 0) + 1
        return out

    def select(self, split: str, shots: int | None = None, seed: int = 1, classes: str = "all") -> Subset:
        """Few-shot (Dassl, docs/protocols.md) then base/novel (Dassl's subsample_classes), from the manifest.

        As in CoOp, the few-shot draw runs on all classes before the class halves are taken, and the
        validation draw (min(K, 4) per class) continues the same seeded RNG after the train draw, so
        `select("val", shots=K, seed=s)` matches the val set CoOp builds with K shots and seed s."""
        if split not in self.splits:
            raise DataError(f"{self.path}: split {split!r} not built; available {list(self.splits)}")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise DataError(f"shots={shots!r}: expected None or an integer K >= 1")
        keep = base_novel_classes(len(self.classnames), classes, self._present)
        from_train = split == "val" and self.val_from_train
        if from_train and shots is None:
            raise DataError(f"{self.path}: no val split was built; validation is drawn from the train items a "
                            "K-shot draw leaves, so select('val') needs shots=K")
        idx = [i for i, s in enumerate(self._columns["split"]) if s == split]
        if shots is not None:
            rng = random.Random(seed)
            train_idx = [i for i, s in enumerate(self._columns["split"]) if s == "train"]
            picked = fewshot_indices([int(self._labels[i]) for i in train_idx], shots, rng)
            if split == "train":
                idx = [train_idx[j] for j in picked]
            else:
                if from_train:
                    taken = {train_idx[j] for j in picked}
                    idx = [i for i in train_idx if i not in taken]
                if split == "val":
                    shots = min(shots, 4)
                picked = fewshot_indices([int(self._labels[i]) for i in idx], shots, rng)
                idx = [idx[j] for j in picked]
        relabel = {old: new for new, old in enumerate(keep)}
        idx = [i for i in idx if int(self._labels[i]) in relabel]
        bad = [i for i in idx if self._bad[i]]
        if bad:
            # Drawn exactly as Dassl draws (it keeps the entry), then left out: the image cannot be loaded.
            idx = [i for i in idx if not self._bad[i]]
            warnings.warn(f"{self.path}: {len(bad)} image(s) of this {split} selection (shots={shots}, seed={seed}, "
                          f"classes={classes}) failed to decode at build time (--skip-bad) and are left out, e.g. "
                          f"{self.manifest.column('path')[bad[0]].as_py()}", BadImagesLeftOut, stacklevel=2)
        ia = np.asarray(idx, dtype=np.int64)
        return Subset(
            root=str(self.path), split=split, classnames=tuple(self.classnames[c] for c in keep),
            keys=tuple(self._columns["key"][i] for i in idx), shards=tuple(self._columns["shard"][i] for i in idx),
            offsets=self._offsets[ia] if len(ia) else np.zeros(0, np.int64),
            sizes=self._sizes[ia] if len(ia) else np.zeros(0, np.int64),
            labels=np.asarray([relabel[int(self._labels[i])] for i in idx], dtype=np.int64),
            checksums=tuple(self._columns["checksum"][i] for i in idx), left_out=len(bad),
        )


REBUILD = "rebuild the dataset with `hisf-bench data build`"
# info.json keys BuiltDataset reads, with what each must be.
INFO_KEYS = {"key": (str, "a string"), "classnames": (list, "a list of strings"), "template": (str, "a string"),
             "splits": (dict, "an object of splits")}
MANIFEST_COLUMNS = {"key": "string", "split": "string", "shard": "string", "label": "integer", "offset": "integer",
                    "size": "integer", "checksum": "string", "path": "string"}


def read_info(path: Path) -> dict:
    """info.json as `data build` writes it; a DataError names the file and what was expected otherwise."""
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}); {REBUILD}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); {REBUILD}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object, got a {type(info).__name__}; {REBUILD}")
    for key, (tp, what) in INFO_KEYS.items():
        if key not in info:
            raise DataError(f"{path}: missing {key!r} ({what}); expected the info.json `hisf-bench data build` "
                            f"writes; {REBUILD}")
        if not isinstance(info[key], tp) or (key == "classnames" and not all(isinstance(c, str) for c in info[key])):
            raise DataError(f"{path}: {key!r} should be {what}, got {type(info[key]).__name__}; {REBUILD}")
    for split, s in info["splits"].items():
        if not (isinstance(s, dict) and isinstance(s.get("count"), int) and isinstance(s.get("shards"), dict)
                and all(isinstance(n, int) for n in s["shards"].values())):
            raise DataError(f"{path}: splits.{split} should be {{\"count\": integer, \"shards\": {{file: bytes}}}}, got "
                            f"{s!r}; {REBUILD}")
        for name in s["shards"]:
            # Shards are read as folder / name: a name that leaves the folder would read some other file.
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or "\\" in name or not name:
                raise DataError(f"{path}: shard {name!r} of split {split!r} is not a file inside {path.parent}; "
                                f"expected a path like '{split}/{split}-00000.tar'; {REBUILD}")
    return info


def read_manifest(path: Path):
    """manifest.parquet with the columns BuiltDataset reads; a DataError names the file otherwise."""
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet manifest ({e}); {REBUILD}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; {REBUILD}")
    checks = {"string": pa.types.is_string, "integer": pa.types.is_integer}
    for column, kind in MANIFEST_COLUMNS.items():
        tp = table.schema.field(column).type
        if not checks[kind](tp):
            raise DataError(f"{path}: column {column!r} holds {tp}, expected {kind}s; {REBUILD}")
    return table


def open_dataset(path: str | Path) -> BuiltDataset:
    return BuiltDataset(path)
