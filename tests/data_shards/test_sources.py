"""Round trip of every source layout: build from a tiny fixture, then compare manifest and stored pixels to the source."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import DataError, open_dataset
from data_shards.builder import BuildOptions, build
from data_shards.catalogue import BENCHMARK_11, CATALOGUE, IMAGENET_VARIANTS
from data_shards.images import decode, eval_view
from tests.data_shards.layouts import image_bytes, make_image, write_clip_benchmark, write_coop

OPTS = BuildOptions(image_size=16, train_size=24)
COOP = {  # key -> (folder, image sub-folder, split file name)
    "caltech101": ("caltech-101", "101_ObjectCategories", "Caltech101"),
    "oxford_pets": ("oxford_pets", "images", "OxfordPets"),
    "stanford_cars": ("stanford_cars", "", "StanfordCars"),
    "oxford_flowers": ("oxford_flowers", "jpg", "OxfordFlowers"),
    "food101": ("food-101", "images", "Food101"),
    "sun397": ("sun397", "SUN397", "SUN397"),
    "dtd": ("dtd", "images", "DescribableTextures"),
    "eurosat": ("eurosat", "2750", "EuroSAT"),
    "ucf101": ("ucf101", "UCF-101-midframes", "UCF101"),
    "demo": ("demo", "images", "Demo"),
}


def stored(ds, row: dict) -> bytes:
    with open(ds.path / row["shard"], "rb") as f:
        f.seek(row["offset"])
        return f.read(row["size"])


def check_round_trip(out: Path, expected: dict[str, list[tuple[str, int, str]]], sources: dict[str, str], classnames):
    """Manifest rows equal the source's (path, label, classname) per split; stored eval images match
    CLIP's resize + centre crop of the original within JPEG error; train images keep their aspect."""
    ds = open_dataset(out)
    assert ds.classnames == tuple(classnames)
    rows = ds.manifest.to_pylist()
    for split, items in expected.items():
        got = Counter((r["path"], r["label"], r["classname"]) for r in rows if r["split"] == split)
        assert got == Counter(items), split
    assert ds.splits == tuple(s for s in ("train", "val", "test") if expected.get(s))
    for r in rows:
        img = decode(stored(ds, r))
        orig = Image.open(sources[r["path"]]).convert("RGB")
        assert ds.classnames[r["label"]] == r["classname"]
        if r["split"] == "train":
            assert min(img.size) == min(min(orig.size), OPTS.stored_train_size)
            continue
        assert img.size == (16, 16)
        ref = np.asarray(eval_view(orig, 16), dtype=np.float32)
        assert np.abs(np.asarray(img, dtype=np.float32) - ref).mean() < 8.0, r["path"]
    return ds


@pytest.mark.parametrize("key", sorted(COOP))
def test_coop_split_json_layouts(tmp_path, key):
    folder, sub, name = COOP[key]
    classes = ["AnnualCrop", "SeaLake", "Forest"] if key == "eurosat" else ["alpha", "beta", "gamma"]
    split = write_coop(tmp_path / "DATA", folder, sub, name, classes)
    build(key, tmp_path / "DATA", tmp_path / key, OPTS, progress=False)
    renames = {"AnnualCrop": "Annual Crop Land", "SeaLake": "Sea or Lake", "Forest": "Forest"}
    named = (lambda n: renames[n]) if key == "eurosat" else (lambda n: n)
    image_dir = tmp_path / "DATA" / folder / sub
    expected = {s: [(p, y, named(n)) for p, y, n in items] for s, items in split.items()}
    sources = {p: str(image_dir / p) for items in split.values() for p, _, _ in items}
    ds = check_round_trip(tmp_path / key, expected, sources, [named(c) for c in classes])
    assert ds.template == CATALOGUE[key].template


def test_fgvc_aircraft_variant_files(tmp_path):
    d = tmp_path / "DATA" / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    expected, sources, n = {}, {}, 0
    for split in ("train", "val", "test"):
        lines = []
        for label, v in enumerate(variants):
            for _ in range(2):
                im = f"{1000000 + n}"
                make_image(d / "images" / f"{im}.jpg", n)
                lines.append(f"{im} {v}")
                expected.setdefault(split, []).append((f"{im}.jpg", label, v))
                sources[f"{im}.jpg"] = str(d / "images" / f"{im}.jpg")
                n += 1
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    build("fgvc_aircraft", tmp_path / "DATA", tmp_path / "out", OPTS, progress=False)
    ds = check_round_trip(tmp_path / "out", expected, sources, variants)
    assert ds.template == "a photo of a {}, a type of aircraft."


def write_imagenet(data: Path, wnids: dict[str, str], train_per_class=6, val_per_class=2) -> dict:
    d = data / "imagenet"
    (d).mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    files, n = {}, 0
    for folder, count in (("train", train_per_class), ("val", val_per_class)):
        for w in wnids:
            for _ in range(count):
                rel = f"{w}/{w}_{n}.JPEG"
                make_image(d / "images" / folder / rel, n)
                files.setdefault(folder, []).append((rel, str(d / "images" / folder / rel)))
                n += 1
    return files


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def test_imagenet_train_val_with_classnames(tmp_path):
    files = write_imagenet(tmp_path / "DATA", WNIDS)
    build("imagenet", tmp_path / "DATA", tmp_path / "out", OPTS, progress=False)
    ds = open_dataset(tmp_path / "out")
    assert ds.classnames == ("tench", "goldfish", "great white shark")
    rows = ds.manifest.to_pylist()
    labels = {w: i for i, w in enumerate(sorted(WNIDS))}
    # ImageNet's val folder is the test split; every train image stays in train (CoOp's K-shot pool) and no
    # val split is built: validation comes from the train items a K-shot draw leaves (never test).
    test = Counter((r["path"], r["label"]) for r in rows if r["split"] == "test")
    assert test == Counter((rel, labels[rel.split("/")[0]]) for rel, _ in files["val"])
    train = [(r["path"], r["label"]) for r in rows if r["split"] == "train"]
    assert Counter(train) == Counter((rel, labels[rel.split("/")[0]]) for rel, _ in files["train"])
    assert not any(r["split"] == "val" for r in rows)
    assert ds.val_from_train and "val" in ds.splits
    for shots, seed in ((2, 1), (2, 2), (4, 3)):
        shot = ds.select("train", shots=shots, seed=seed)
        val = ds.select("val", shots=shots, seed=seed)
        assert not set(shot.keys) & set(val.keys)
        assert set(val.keys) <= {r["key"] for r in rows if r["split"] == "train"}
        # min(K, 4) per class, capped by what the train draw left (6 per class here).
        assert Counter(val.labels.tolist()) == {y: min(shots, 4, 6 - shots) for y in range(3)}
        assert val.keys == ds.select("val", shots=shots, seed=seed).keys
    with pytest.raises(DataError, match="needs shots=K"):
        ds.select("val")
    for r in rows:
        assert r["classname"] == WNIDS[sorted(WNIDS)[r["label"]]]


@pytest.mark.parametrize("key,sub,present", [
    ("imagenetv2", "imagenetv2/imagenetv2-matched-frequency-format-val", ["0", "1", "2"]),
    ("imagenet_sketch", "imagenet-sketch/images", sorted(WNIDS)),
    ("imagenet_a", "imagenet-adversarial/imagenet-a", ["n01440764", "n01484850"]),
    ("imagenet_r", "imagenet-rendition/imagenet-r", ["n01443537", "n01484850"]),
])
def test_imagenet_variants(tmp_path, key, sub, present):
    data = tmp_path / "DATA"
    write_imagenet(data, WNIDS, 1, 1)  # variants read ImageNet's classnames.txt
    expected, sources, n = [], {}, 100
    ordered = [WNIDS[w] for w in sorted(WNIDS)]
    for label, folder in enumerate(present):
        for _ in range(2):
            rel = f"{folder}/x{n}.jpg"
            make_image(data / sub / rel, n)
            name = ordered[int(folder)] if key == "imagenetv2" else WNIDS[folder]
            # A and R: the present 200-class subset relabelled 0..m-1 in sorted order (CoOp).
            expected.append((rel, int(folder) if key == "imagenetv2" else label, name))
            sources[rel] = str(data / sub / rel)
            n += 1
    build(key, data, tmp_path / key, OPTS, progress=False)
    names = ordered if key == "imagenetv2" else [WNIDS[f] for f in present]
    ds = check_round_trip(tmp_path / key, {"test": expected}, sources, names)
    assert ds.splits == ("test",)


def test_image_folder_flat_is_split_50_20_30(tmp_path):
    root = tmp_path / "pics"
    sources = {}
    for c, k in (("cat", 10), ("dog_breed", 10)):
        for i in range(k):
            p = make_image(root / c / f"{i}.png", hash((c, i)) % 10000)
            sources[f"{c}/{i}.png"] = str(p)
    build("imagefolder", root, tmp_path / "out", OPTS, progress=False)
    ds = open_dataset(tmp_path / "out")
    assert ds.classnames == ("cat", "dog breed")
    counts = ds.counts()
    assert counts == {"train": {"cat": 5, "dog breed": 5}, "val": {"cat": 2, "dog breed": 2}, "test": {"cat": 3, "dog breed": 3}}
    assert sorted(r["path"] for r in ds.manifest.to_pylist()) == sorted(sources)


def test_image_folder_with_split_folders(tmp_path):
    root = tmp_path / "pics"
    expected, sources, n = {"train": [], "test": []}, {}, 0
    for split, k in (("train", 5), ("test", 2)):
        for label, c in enumerate(("a", "b")):
            for i in range(k):
                make_image(root / split / c / f"{i}.png", n)
                expected[split].append((f"{c}/{i}.png", label, c))
                sources.setdefault(split, {})[f"{c}/{i}.png"] = str(root / split / c / f"{i}.png")
                n += 1
    build("imagefolder", root, tmp_path / "out", OPTS, progress=False)
    ds = open_dataset(tmp_path / "out")
    rows = ds.manifest.to_pylist()
    assert Counter((r["path"], r["label"]) for r in rows if r["split"] == "test") == Counter((p, y) for p, y, _ in expected["test"])
    train = Counter((r["path"], r["label"]) for r in rows if r["split"] == "train")
    assert train == Counter((p, y) for p, y, _ in expected["train"])
    # No val folder: validation comes from the train items the K-shot draw leaves.
    assert "val" not in ds.counts() and ds.val_from_train
    assert Counter(ds.select("val", shots=2, seed=1).labels.tolist()) == {0: 2, 1: 2}


def test_clip_benchmark_webdataset_layout(tmp_path):
    root = tmp_path / "wds_cars"
    write_clip_benchmark(root, ["sedan", "truck", "van"], {"train": [4, 3], "test": [5, 2]})
    build("clip_benchmark", root, tmp_path / "out", OPTS, progress=False)
    ds = open_dataset(tmp_path / "out")
    assert ds.classnames == ("sedan", "truck", "van")
    assert ds.template == "a photo of a {}."
    assert ds.templates == ("a photo of a {}.", "a drawing of a {}.")
    rows = ds.manifest.to_pylist()
    test = sorted((r["path"], r["label"]) for r in rows if r["split"] == "test")
    ext = ("webp", "png", "jpg")
    expected = sorted((f"test/{0 if n < 12 else 1}.tar:s{n:07d}.{ext[n % 3]}", n % 3) for n in range(7, 14))
    assert test == expected
    assert len([r for r in rows if r["split"] in ("train", "val")]) == 7
    for r in rows:
        if r["split"] == "test":
            n = int(r["path"].split(":s")[1].split(".")[0])
            src = Image.open(__import__("io").BytesIO(image_bytes(n, {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}[ext[n % 3]]))).convert("RGB")
            ref = np.asarray(eval_view(src, 16), dtype=np.float32)
            assert np.abs(np.asarray(decode(stored(ds, r)), dtype=np.float32) - ref).mean() < 8.0


def test_catalogue_covers_the_benchmark():
    assert len(BENCHMARK_11) == 11 and len(IMAGENET_VARIANTS) == 4
    for key in BENCHMARK_11 + IMAGENET_VARIANTS:
        assert key in CATALOGUE and "{}" in CATALOGUE[key].template
    from data_shards.sources import shipped_imagenet_names
    names = shipped_imagenet_names()
    # CLIP's list (open_clip zero_shot_metadata) names two pairs alike: "missile" and "sunglasses".
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet paper" and len(set(names)) == 998


def test_imagenet_names_fall_back_to_the_shipped_list(tmp_path):
    """Without classnames.txt: ImageNet needs all 1000 class folders (sorted wnid = label), ImageNet-V2's
    numbered folders index the shipped list directly."""
    from data_shards.sources import shipped_imagenet_names

    names = shipped_imagenet_names()
    d = tmp_path / "DATA" / "imagenet" / "images"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for w in wnids:
        (d / "train" / w).mkdir(parents=True)
    for i in (0, 7, 999):
        for folder in ("train", "val"):
            make_image(d / folder / wnids[i] / "a.jpg", i)
    build("imagenet", tmp_path / "DATA", tmp_path / "inet", OPTS, progress=False)
    ds = open_dataset(tmp_path / "inet")
    assert ds.classnames == tuple(names)
    assert sorted((r["label"], r["classname"]) for r in ds.manifest.to_pylist() if r["split"] == "test") == \
        [(0, "tench"), (7, names[7]), (999, "toilet paper")]
    (d / "train" / wnids[5]).rmdir()
    with pytest.raises(DataError, match="classnames.txt: file not found"):
        build("imagenet", tmp_path / "DATA", tmp_path / "inet2", OPTS, progress=False)
    v2 = tmp_path / "DATA" / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for i in (3, 998):
        make_image(v2 / str(i) / "b.jpeg", i)
    build("imagenetv2", tmp_path / "DATA", tmp_path / "v2", OPTS, progress=False)
    rows = open_dataset(tmp_path / "v2").manifest.to_pylist()
    assert sorted((r["label"], r["classname"]) for r in rows) == [(3, names[3]), (998, names[998])]
