"""The builder: deterministic output whatever the job count, resumable, size-bounded shards."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from data_shards import DataError, open_dataset
from data_shards.builder import BuildOptions, build
from tests.data_shards.layouts import write_coop


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


@pytest.fixture()
def data(tmp_path):
    write_coop(tmp_path / "DATA", "oxford_pets", "images", "OxfordPets", [f"class{i}" for i in range(5)], per_split=(6, 2, 4))
    return tmp_path / "DATA"


def test_parallel_build_equals_serial(data, tmp_path):
    opts = BuildOptions(image_size=16, shard_size=8192)
    build("oxford_pets", data, tmp_path / "a", opts, progress=False)
    build("oxford_pets", data, tmp_path / "b", BuildOptions(image_size=16, shard_size=8192, jobs=2), progress=False)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert len(a) > 4 and a == b
    ma, mb = open_dataset(tmp_path / "a").manifest, open_dataset(tmp_path / "b").manifest
    assert ma.equals(mb) and ma.num_rows == 5 * 12
    keys = ma.column("key").to_pylist()
    assert len(set(keys)) == len(keys)


def test_shards_are_size_bounded_and_readable_as_webdataset(data, tmp_path):
    import webdataset as wds

    bound = 8192
    info = build("oxford_pets", data, tmp_path / "out", BuildOptions(image_size=16, shard_size=bound), progress=False)
    ds = open_dataset(tmp_path / "out")
    per_shard = {}
    for r in ds.manifest.to_pylist():
        per_shard.setdefault(r["shard"], []).append(r)
    for name, rows in per_shard.items():
        with tarfile.open(tmp_path / "out" / name) as tf:
            members = tf.getmembers()
        # Member data plus headers stay under the bound; the file adds tar's 10 KiB record padding at most.
        assert sum(m.size + 512 for m in members) <= bound
        assert (tmp_path / "out" / name).stat().st_size <= bound + 10240
    assert len(info["splits"]["train"]["shards"]) >= 3
    urls = [str(tmp_path / "out" / s) for s in info["splits"]["test"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None))
    test_rows = [r for r in ds.manifest.to_pylist() if r["split"] == "test"]
    assert [s["__key__"] for s in samples] == [r["key"] for r in test_rows]
    assert [int(s["cls"]) for s in samples] == [r["label"] for r in test_rows]


def test_resume_keeps_finished_shards(data, tmp_path):
    out = tmp_path / "out"
    opts = BuildOptions(image_size=16, shard_size=8192)
    build("oxford_pets", data, out, opts, progress=False)
    before = snapshot(out)
    manifest = open_dataset(out).manifest
    stamps = {p: os.stat(out / p).st_mtime_ns for p in before}
    victim = sorted(p for p in before if p.startswith("train/"))[1]
    (out / victim).unlink()  # an interrupted build: one shard missing, manifest and info not yet written
    (out / "manifest.parquet").unlink()
    (out / "info.json").unlink()
    build("oxford_pets", data, out, BuildOptions(image_size=16, shard_size=8192, jobs=2), progress=False)
    assert snapshot(out) == before
    assert open_dataset(out).manifest.equals(manifest)
    victim_task = victim[:len("train/train-00000")]  # a task rewrites all of its parts
    for p, t in stamps.items():
        if not p.startswith(victim_task):
            assert os.stat(out / p).st_mtime_ns == t, p  # untouched


def test_out_folder_of_another_build_is_refused(data, tmp_path):
    build("oxford_pets", data, tmp_path / "out", BuildOptions(image_size=16), progress=False)
    with pytest.raises(DataError, match="build.json"):
        build("oxford_pets", data, tmp_path / "out", BuildOptions(image_size=24), progress=False)
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["image_size"] == 16 and sum(s["count"] for s in info["splits"].values()) == 60


def test_bad_build_options_are_named(data, tmp_path):
    with pytest.raises(DataError, match="--image-size"):
        build("oxford_pets", data, tmp_path / "o", BuildOptions(image_size=4), progress=False)
    with pytest.raises(DataError, match="--train-size"):
        build("oxford_pets", data, tmp_path / "o", BuildOptions(image_size=32, train_size=16), progress=False)
    with pytest.raises(DataError, match="unknown key"):
        build("imagenet21k", data, tmp_path / "o", progress=False)


def test_fingerprint_names_what_the_build_holds(data, tmp_path):
    """Same images, splits and settings: one fingerprint wherever the folder is; another image size: another."""
    build("oxford_pets", data, tmp_path / "a", BuildOptions(image_size=16), progress=False)
    build("oxford_pets", data, tmp_path / "elsewhere" / "b", BuildOptions(image_size=16, jobs=2), progress=False)
    build("oxford_pets", data, tmp_path / "c", BuildOptions(image_size=20), progress=False)
    a, b, c = (open_dataset(tmp_path / p).fingerprint for p in ("a", "elsewhere/b", "c"))
    assert len(a) == 16 and a == b and a != c
