"""Converting a source layout into WebDataset shards plus a Parquet manifest: resumable, parallel, deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_shards.catalogue import dataset_name, get_entry
from data_shards.errors import DataError
from data_shards.images import check_original, encode_stored
from data_shards.sources import Record

# 2: rows of images that failed to decode stay in the manifest (flagged `bad`); exact mode; dataset names.
FORMAT_VERSION = 2
# Estimated stored bytes per pixel of a q90 JPEG; sets how many samples a size-bounded shard plans for.
BYTES_PER_PIXEL = 0.35
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("label", pa.int32()),
    ("classname", pa.string()), ("path", pa.string()), ("checksum", pa.string()),
    ("offset", pa.int64()), ("size", pa.int64()), ("bad", pa.bool_()),
])
IMAGE_MODES = ("fast", "exact")


@dataclass(frozen=True)
class BuildOptions:
    image_size: int = 224  # evaluation size: val/test images are stored resized + centre-cropped to it
    train_size: int | None = None  # shorter side cap of stored train images; None = 1.5 x image_size
    shard_size: int = 256 * 2**20  # bytes per shard, upper bound
    quality: int = 90
    jobs: int = 1
    skip_bad: bool = False
    # True: keep every original's bytes (no re-encode, no pre-crop); the loaders apply CoOp's transforms to
    # them, so trials see CoOp's exact pixels. False ("fast"): the re-encoded, size-capped copies above.
    exact: bool = False

    @property
    def image_mode(self) -> str:
        return "exact" if self.exact else "fast"

    @property
    def stored_train_size(self) -> int:
        return self.train_size or int(round(1.5 * self.image_size))

    def validate(self) -> None:
        if self.image_size < 8:
            raise DataError(f"--image-size: expected >= 8, got {self.image_size}")
        if self.stored_train_size < self.image_size:
            raise DataError(f"--train-size: expected >= --image-size ({self.image_size}), got {self.train_size}")
        if self.shard_size < 4096:
            raise DataError(f"--shard-size: expected >= 4096 bytes, got {self.shard_size}")
        if not 1 <= self.quality <= 100 or self.jobs < 1:
            raise DataError(f"--quality 1..100 and --jobs >= 1 expected, got {self.quality}, {self.jobs}")


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    first: int  # index within the split of the task's first record (keys are split + index)
    records: tuple[Record, ...]
    out: str
    mode: str
    size: int
    shard_size: int
    quality: int
    skip_bad: bool

    @property
    def stem(self) -> str:
        return f"{self.split}/{self.split}-{self.index:05d}"


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _task_done(task: ShardTask) -> dict | None:
    """The sidecar of a finished task, if it and every shard it lists are intact (resume keeps them)."""
    side = Path(task.out) / f"{task.stem}.json"
    if not side.is_file():
        return None
    done = json.loads(side.read_text())
    for name, nbytes in done["shards"].items():
        p = Path(task.out) / name
        if not p.is_file() or p.stat().st_size != nbytes:
            return None
    return done


def _stored_bytes(rec: Record, task: ShardTask) -> tuple[bytes, str]:
    """What the shard keeps of one record and its member extension: the original (exact) or a re-encode."""
    raw = rec.read_bytes()
    if task.mode == "exact":
        return raw, check_original(raw)
    return encode_stored(raw, task.mode, task.size, task.quality)[0], "jpg"


def run_task(task: ShardTask) -> dict:
    """Write one task's records into one or more size-bounded tar shards; returns its manifest rows.

    With skip_bad, a record that fails to decode keeps its row (flagged `bad`, no shard) so that few-shot
    draws see the same list as Dassl, which keeps the entry; selections leave it out afterwards."""
    import webdataset as wds

    out = Path(task.out)
    rows, skipped, shards = [], [], {}
    part, writer, written, tmp_path, part_name, part_rows = 0, None, 0, None, None, []

    def close_part():
        nonlocal writer, part_rows
        writer.close()
        final = out / part_name
        os.replace(tmp_path, final)
        with tarfile.open(final) as tf:
            offsets = {m.name: (m.offset_data, m.size) for m in tf}
        for row in part_rows:
            row["offset"], row["size"] = offsets[row.pop("member")]
        shards[part_name] = final.stat().st_size
        writer, part_rows = None, []

    for i, rec in enumerate(task.records):
        key = f"{task.split}{task.first + i:07d}"
        row = {"key": key, "split": task.split, "label": rec.label, "classname": rec.classname, "path": rec.path}
        try:
            data, ext = _stored_bytes(rec, task)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for broken files
            if not task.skip_bad:
                raise DataError(f"{rec.path} ({rec.src}): image fails to decode ({type(e).__name__}: {e}); "
                                "fix or remove it, or build with --skip-bad") from None
            skipped.append({"path": rec.path, "split": task.split, "key": key, "error": f"{type(e).__name__}: {e}"})
            rows.append({**row, "shard": "", "checksum": "", "offset": 0, "size": 0, "bad": True})
            continue
        if writer is not None and written + len(data) + 2048 > task.shard_size:
            close_part()
            part += 1
        if writer is None:
            part_name = f"{task.stem}.tar" if part == 0 else f"{task.stem}-{part}.tar"
            tmp_path = out / (part_name + ".tmp")
            writer = wds.TarWriter(str(tmp_path), encoder=False, mtime=0.0)
            written = 0
        writer.write({"__key__": key, ext: data, "cls": str(rec.label).encode()})
        written += len(data) + 2048
        rows.append({**row, "shard": part_name, "checksum": _sha1(data), "bad": False, "member": f"{key}.{ext}"})
        part_rows.append(rows[-1])
    if writer is not None:
        close_part()
    done = {"rows": rows, "skipped": skipped, "shards": shards}
    _write_atomic(out / f"{task.stem}.json", json.dumps(done))
    return done


def _mean_source_bytes(recs: list[Record], n: int = 64) -> int:
    """Mean stored size of an exact build's originals, from an evenly spaced sample of the records."""
    step = max(1, len(recs) // n)
    sizes = [r.size if r.offset >= 0 else os.path.getsize(r.src) for r in recs[::step]]
    return max(1, int(sum(sizes) / max(1, len(sizes))))


def plan_tasks(listing, out: Path, opts: BuildOptions) -> list[ShardTask]:
    tasks = []
    for split in ("train", "val", "test"):
        recs = listing.splits.get(split) or []
        mode, size = ("train", opts.stored_train_size) if split == "train" else ("eval", opts.image_size)
        est = max(1, int(BYTES_PER_PIXEL * size * size * (1.4 if mode == "train" else 1.0)))
        if opts.exact and recs:
            mode, est = "exact", _mean_source_bytes(recs)
        per_shard = max(1, opts.shard_size // (est + 2048))
        for t, start in enumerate(range(0, len(recs), per_shard)):
            tasks.append(ShardTask(split, t, start, tuple(recs[start:start + per_shard]), str(out), mode, size,
                                   opts.shard_size, opts.quality, opts.skip_bad))
    return tasks


def _fingerprint(source: str, name: str, listing, opts: BuildOptions) -> dict:
    h = hashlib.sha1()
    for split in sorted(listing.splits):
        for r in listing.splits[split]:
            h.update(f"{split}\0{r.path}\0{r.label}\n".encode())
    o = asdict(opts)
    o.pop("jobs")  # neither changes what a finished shard holds, so a resumed build may change them
    o.pop("skip_bad")
    return {"key": name, "source": source, "options": o, "records": h.hexdigest(), "format": FORMAT_VERSION}


def build(key: str, root: str | Path, out: str | Path, opts: BuildOptions = BuildOptions(), progress: bool = True,
          name: str | None = None) -> dict:
    """Build catalogue dataset `key` (or a generic source: imagefolder, clip_benchmark) from `root` into `out`;
    finished shards of an interrupted build are kept. A generic build is recorded under `name` (default: the
    out folder's name), which BuiltDataset.key returns and specs name; a catalogue build under its key."""
    opts.validate()
    entry = get_entry(key)
    name = dataset_name(key, name, out)
    root, out = Path(root), Path(out)
    if not root.exists():
        raise DataError(f"{root}: data root folder not found")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; expected a folder")
    listing = entry.read(root)
    if not any(listing.splits.values()):
        raise DataError(f"{root}: dataset {key!r} lists no images")
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(key, name, listing, opts)
    fp_path = out / "build.json"
    if fp_path.is_file() and json.loads(fp_path.read_text()) != fp:
        raise DataError(f"{out}: holds a build of other data or options ({fp_path}); use a fresh --out folder")
    _write_atomic(fp_path, json.dumps(fp, indent=1))
    for split, recs in listing.splits.items():
        if recs:
            (out / split).mkdir(exist_ok=True)
    tasks = plan_tasks(listing, out, opts)
    results: dict[int, dict] = {}
    pending = []
    for i, t in enumerate(tasks):
        done = _task_done(t)
        if done is not None:
            results[i] = done
        else:
            pending.append(i)
    _run(tasks, pending, results, opts.jobs, progress, total=sum(len(t.records) for t in tasks))
    rows = [row for i in range(len(tasks)) for row in results[i]["rows"]]
    skipped = [s for i in range(len(tasks)) for s in results[i]["skipped"]]
    return _finish(key, name, listing, out, opts, tasks, results, rows, skipped)


def _run(tasks, pending, results, jobs, progress, total) -> None:
    from tqdm import tqdm

    done_n = sum(len(tasks[i].records) for i in results)
    bar = tqdm(total=total, initial=done_n, unit="img", desc="build", disable=not progress, file=sys.stderr)
    try:
        if jobs == 1 or len(pending) <= 1:
            for i in pending:
                results[i] = run_task(tasks[i])
                bar.update(len(tasks[i].records))
            return
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_task, tasks[i]): i for i in pending}
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
                for f in finished:
                    if f.exception() is not None:
                        for r in remaining:
                            r.cancel()
                        raise f.exception()
                    results[futures[f]] = f.result()
                    bar.update(len(tasks[futures[f]].records))
    finally:
        bar.close()


def _finish(source, name, listing, out: Path, opts, tasks, results, rows, skipped) -> dict:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    tmp = out / "manifest.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "manifest.parquet")
    splits = {}
    for i, t in enumerate(tasks):
        # count: manifest rows, `bad` ones (failed to decode, kept for the few-shot draw) included.
        s = splits.setdefault(t.split, {"count": 0, "bad": 0, "shards": {}})
        s["count"] += len(results[i]["rows"])
        s["bad"] += len(results[i]["skipped"])
        s["shards"].update(results[i]["shards"])
    info = {
        "format": FORMAT_VERSION, "key": name, "source": source, "classnames": list(listing.classnames),
        "template": listing.template, "templates": list(listing.templates or (listing.template,)),
        "image_mode": opts.image_mode, "image_size": opts.image_size,
        "train_size": None if opts.exact else opts.stored_train_size, "splits": splits, "skipped": skipped,
        # How the splits were made when the source has none of its own (a flat image folder), else absent.
        **({"split_rule": listing.notes["split_rule"]} if listing.notes.get("split_rule") else {}),
    }
    _write_atomic(out / "info.json", json.dumps(info, indent=1))
    return info
