"""Bad input: each case raises a DataError naming the file (or lists skipped images), and keeps what was written."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from data_shards import DataError, make_loader, open_dataset
from data_shards.builder import BuildOptions, build
from data_shards.dataset import BadImagesLeftOut
from tests.data_shards.layouts import MEAN, STD, make_image, write_clip_benchmark, write_coop

OPTS = BuildOptions(image_size=16, shard_size=8192)


@pytest.fixture()
def pets(tmp_path):
    split = write_coop(tmp_path / "DATA", "oxford_pets", "images", "OxfordPets", ["a", "b", "c"], per_split=(4, 2, 3))
    return tmp_path / "DATA", split


def test_missing_folders_and_split_file(tmp_path, pets):
    data, _ = pets
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: data root folder not found"):
        build("oxford_pets", tmp_path / "nowhere", tmp_path / "o", OPTS, progress=False)
    with pytest.raises(DataError, match=f"{data / 'caltech-101'}: dataset folder not found"):
        build("caltech101", data, tmp_path / "o", OPTS, progress=False)
    (data / "oxford_pets" / "split_zhou_OxfordPets.json").rename(data / "oxford_pets" / "old.json")
    with pytest.raises(DataError, match="split_zhou_OxfordPets.json: split file not found"):
        build("oxford_pets", data, tmp_path / "o", OPTS, progress=False)
    assert not (tmp_path / "o").exists()  # nothing started before the input was checked


def test_missing_listed_image(tmp_path, pets):
    data, split = pets
    gone = data / "oxford_pets" / "images" / split["test"][1][0]
    gone.unlink()
    with pytest.raises(DataError, match=f"1 listed image file\\(s\\) not found, e.g. {gone}"):
        build("oxford_pets", data, tmp_path / "o", OPTS, progress=False)


def test_class_missing_from_class_list(tmp_path, pets):
    data, split = pets
    split["test"].append(["c/img_0000.jpg", 7, "zebra"])
    f = data / "oxford_pets" / "split_zhou_OxfordPets.json"
    f.write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"split_zhou_OxfordPets.json: test\[9\] has class \(7, 'zebra'\) that the train class list lacks"):
        build("oxford_pets", data, tmp_path / "o", OPTS, progress=False)


def test_fgvc_variant_missing_from_variants_txt(tmp_path):
    d = tmp_path / "DATA" / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("707-320\nA300B4\n")
    for i, split in enumerate(("train", "val", "test")):
        make_image(d / "images" / f"{i}.jpg", i)
        (d / f"images_variant_{split}.txt").write_text(f"{i} 707-320\n" + (f"{i} Boeing 999\n" if split == "val" else ""))
    with pytest.raises(DataError, match=r"images_variant_val.txt:2: variant 'Boeing 999' is not in .*variants.txt"):
        build("fgvc_aircraft", tmp_path / "DATA", tmp_path / "o", OPTS, progress=False)


def test_imagenet_folder_missing_from_classnames(tmp_path):
    d = tmp_path / "DATA" / "imagenet"
    for folder in ("train", "val"):
        for w in ("n01", "n02"):
            make_image(d / "images" / folder / w / "x.jpg", 1)
    (d / "classnames.txt").write_text("n01 tench\n")
    with pytest.raises(DataError, match=r"classnames.txt: lacks class folder\(s\) \['n02'\]"):
        build("imagenet", tmp_path / "DATA", tmp_path / "o", OPTS, progress=False)


def test_clip_benchmark_class_out_of_range_and_truncated_tar(tmp_path):
    root = tmp_path / "wds"
    write_clip_benchmark(root, ["x", "y", "z"], {"test": [4]})
    (root / "classnames.txt").write_text("x\ny\n")
    with pytest.raises(DataError, match=r"test/0.tar: sample 's0000002' has class 2 that classnames.txt \(2 classes\) lacks"):
        build("clip_benchmark", root, tmp_path / "o", OPTS, progress=False)
    (root / "classnames.txt").write_text("x\ny\nz\n")
    tar = root / "test" / "0.tar"
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-2]  # the last image
    tar.write_bytes(tar.read_bytes()[: last.offset_data + 10])
    with pytest.raises(DataError, match=f"{tar}: .*truncated"):
        build("clip_benchmark", root, tmp_path / "o", OPTS, progress=False)


def test_undecodable_image_errors_or_is_skipped_and_listed(tmp_path, pets, capsys):
    data, split = pets
    bad = data / "oxford_pets" / "images" / split["test"][2][0]
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "o"
    with pytest.raises(DataError, match=f"{split['test'][2][0]} \\({bad}\\): image fails to decode .*--skip-bad"):
        build("oxford_pets", data, out, OPTS, progress=False)
    # Nothing already written is lost: the train/val shards finished before the failing test shard.
    finished = {p: os.stat(p).st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert finished and not (out / "info.json").exists()
    from orchestrator.cli import main

    rc = main(["data", "build", "--dataset", "oxford_pets", "--root", str(data), "--out", str(out), "--image-size", "16",
               "--shard-size", "8K", "--quiet", "--skip-bad"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert {p: os.stat(p).st_mtime_ns for p in (out / "train").glob("*.tar")} == finished
    assert "1 image(s) failed to decode" in printed and split["test"][2][0] in printed
    info = json.loads((out / "info.json").read_text())
    assert [s["path"] for s in info["skipped"]] == [split["test"][2][0]]
    # The entry stays in the manifest, flagged, so draws match Dassl's; selections leave it out and say so.
    assert info["splits"]["test"]["count"] == 9 and info["splits"]["test"]["bad"] == 1
    ds = open_dataset(out)
    rows = [r for r in ds.manifest.to_pylist() if r["path"] == split["test"][2][0]]
    assert len(rows) == 1 and rows[0]["bad"] and rows[0]["shard"] == "" and rows[0]["size"] == 0
    assert sum(ds.counts()["test"].values()) == 8 and sum(ds.counts(bad=True)["test"].values()) == 1
    with pytest.warns(BadImagesLeftOut, match="1 image\\(s\\) of this test selection .* left out"):
        sub = ds.select("test")
    assert len(sub) == 8 and sub.left_out == 1


def built(tmp_path, pets) -> Path:
    data, _ = pets
    out = tmp_path / "built"
    build("oxford_pets", data, out, OPTS, progress=False)
    return out


def test_truncated_shard_is_named(tmp_path, pets):
    out = built(tmp_path, pets)
    shard = sorted((out / "test").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(DataError, match=f"{shard}: shard is 1500 bytes, info.json records"):
        open_dataset(out)
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard}: shard listed in .*info.json is missing"):
        open_dataset(out)


def test_manifest_that_does_not_match_its_shards(tmp_path, pets):
    out = built(tmp_path, pets)
    info = json.loads((out / "info.json").read_text())
    info["splits"]["test"]["count"] += 1
    (out / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="manifest.parquet: 9 rows for split 'test', info.json records 10"):
        open_dataset(out)
    info["splits"]["test"]["count"] -= 1
    (out / "info.json").write_text(json.dumps(info))
    # A shard rewritten with other bytes of the same size: the streamed evaluation names it.
    shard = sorted((out / "test").glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    ds = open_dataset(out)
    first = ds.manifest.to_pylist()[[r["shard"] for r in ds.manifest.to_pylist()].index("test/" + shard.name)]
    raw[first["offset"] + 100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    loader = make_loader(open_dataset(out).select("test"), train=False, batch_size=4, image_size=16, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=f"{shard}: sample {first['key']} does not match the manifest checksum"):
        list(loader)


def test_rows_without_a_shard_must_be_flagged_bad(tmp_path, pets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = built(tmp_path, pets)
    table = pq.read_table(out / "manifest.parquet")
    shards = table.column("shard").to_pylist()
    shards[0] = ""
    pq.write_table(table.set_column(table.column_names.index("shard"), "shard", pa.array(shards)), out / "manifest.parquet")
    with pytest.raises(DataError, match="manifest.parquet: rows without a shard must be exactly those flagged `bad`"):
        open_dataset(out)


def test_not_a_built_dataset(tmp_path):
    with pytest.raises(DataError, match="info.json: not found"):
        open_dataset(tmp_path)


def _write_info(out: Path, edit) -> None:
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps(edit(info)))


@pytest.mark.parametrize("spoil, message", [
    (lambda out: (out / "manifest.parquet").write_bytes(b""), "manifest.parquet: not a readable Parquet manifest"),
    (lambda out: (out / "manifest.parquet").write_bytes(b"PAR1 not really parquet PAR1"),
     "manifest.parquet: not a readable Parquet manifest"),
    (lambda out: (out / "info.json").write_text("{\"key\": \"oxford_pets\", "),
     "info.json: not valid JSON (Expecting property name"),
    (lambda out: (out / "info.json").write_text("[1, 2]"), "info.json: expected a JSON object, got a list"),
    (lambda out: _write_info(out, lambda i: {k: v for k, v in i.items() if k != "template"}),
     "info.json: missing 'template' (a string); expected the info.json `hisf-bench data build` writes"),
    (lambda out: _write_info(out, lambda i: {**i, "classnames": "a,b,c"}),
     "info.json: 'classnames' should be a list of strings, got str"),
    (lambda out: _write_info(out, lambda i: {**i, "splits": {"test": {"count": "9"}}}),
     "info.json: splits.test should be {\"count\": integer, \"shards\": {file: bytes}}"),
])
def test_a_spoilt_info_or_manifest_is_named_with_what_was_expected(tmp_path, pets, spoil, message):
    out = built(tmp_path, pets)
    spoil(out)
    with pytest.raises(DataError) as e:
        open_dataset(out)
    assert message in str(e.value) and str(out) in str(e.value)
    assert "rebuild" in str(e.value)


def test_a_manifest_without_a_column_is_named(tmp_path, pets):
    import pyarrow.parquet as pq

    out = built(tmp_path, pets)
    table = pq.read_table(out / "manifest.parquet")
    pq.write_table(table.drop(["checksum"]), out / "manifest.parquet")
    with pytest.raises(DataError, match=r"manifest.parquet: missing column\(s\) \['checksum'\]"):
        open_dataset(out)


def test_shard_paths_that_leave_the_dataset_folder_are_refused(tmp_path, pets):
    out = built(tmp_path, pets)
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes(b"x" * 10)
    for name in ("../elsewhere.tar", str(outside)):
        def move(info, name=name):
            shards = info["splits"]["test"]["shards"]
            info["splits"]["test"]["shards"] = {name: 10, **{k: v for k, v in list(shards.items())[1:]}}
            return info
        original = (out / "info.json").read_text()
        _write_info(out, move)
        with pytest.raises(DataError, match=f"info.json: shard {name!r} of split 'test' is not a file inside {out}"):
            open_dataset(out)
        (out / "info.json").write_text(original)


def test_data_commands_name_a_bad_out_folder_or_count(tmp_path, pets, capsys):
    from orchestrator.cli import main

    data, _ = pets
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["data", "demo", "--out", str(a_file)]) == 1
    assert capsys.readouterr().err.strip() == f"error: --out {a_file}: is a file; expected a folder"
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--classes", "9"]) == 1
    assert capsys.readouterr().err.strip() == "error: --classes: expected 1..6 (the demo has 6 classes), got 9"
    assert main(["data", "build", "--dataset", "oxford_pets", "--root", str(data), "--out", str(a_file), "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --out {a_file}: is a file; expected a folder"
    with pytest.raises(SystemExit):
        main(["data", "build", "--dataset", "oxford_pets", "--root", str(data), "--out", str(tmp_path / "o"),
              "--shard-size", "infM"])
    assert "expected a size like 256M or 65536, got 'infM'" in capsys.readouterr().err
