"""Data a user brings: CLIP_benchmark's own converter output, user-chosen names, `data info` on every kind of
build, and exact mode (the original bytes, CoOp's transforms at load time) against fast mode."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards import DataError, make_loader, open_dataset
from data_shards.builder import BuildOptions, build
from data_shards.images import crop_box, sample_seed
from data_shards.loader import read_by_range
from orchestrator.cli import main
from tests.data_shards.layouts import MEAN, STD, convert_with_clip_benchmark, make_image

OPTS = BuildOptions(image_size=16, train_size=24)
SHAPES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def cb_source(tmp_path_factory):
    """A dataset written by pip's clip_benchmark converter: 3 classes, 4 train and 2 test images each, no val."""
    root = tmp_path_factory.mktemp("cb") / "wds_shapes"
    return root, convert_with_clip_benchmark(root, SHAPES, {"train": 4, "test": 2})


def test_clip_benchmark_converter_output_is_named_after_the_out_folder(cb_source, tmp_path):
    root, files = cb_source
    info = build("clip_benchmark", root, tmp_path / "data" / "shapes", OPTS, progress=False)
    ds = open_dataset(tmp_path / "data" / "shapes")
    assert info["key"] == ds.key == "shapes" and ds.source == "clip_benchmark" and ds.image_mode == "fast"
    assert ds.classnames == tuple(SHAPES) and ds.templates == ("a photo of a {}.", "a sketch of a {}.")
    rows = ds.manifest.to_pylist()
    # The converter's sample order and labels, file by file.
    assert [r["label"] for r in rows if r["split"] == "test"] == [y for _, y in files["test"]]
    assert [r["path"] for r in rows if r["split"] == "train"] == [f"train/0.tar:s{i:07d}.png" for i in range(12)]
    assert ds.splits == ("train", "val", "test") and ds.val_from_train
    # --name: the same source built a second time under another name, side by side in one data root.
    other = build("clip_benchmark", root, tmp_path / "data" / "shapes_b", OPTS, progress=False, name="shapes_b")
    assert other["key"] == open_dataset(tmp_path / "data" / "shapes_b").key == "shapes_b"


@pytest.mark.parametrize("out,name,match", [
    ("clip_benchmark", None, r"dataset name 'clip_benchmark' from the --out folder's name .* is a catalogue key"),
    ("x", "caltech101", r"dataset name 'caltech101' from --name is a catalogue key.*--name my_caltech101"),
    ("x", "Oxford_Pets", r"'Oxford_Pets' from --name is a catalogue key"),
    ("x", "my cars", r"'my cars' from --name: expected 1-64 letters, digits, '_' or '-'"),
    ("x", "a:b", r"'a:b' from --name: expected"),
    ("x", "-x", r"'-x' from --name: expected"),
    ("x", "", r"'' from --name: expected"),
    ("x", "n" * 65, r"from --name: expected 1-64"),
])
def test_bad_names_are_refused_before_anything_is_written(cb_source, tmp_path, out, name, match):
    with pytest.raises(DataError, match=match):
        build("clip_benchmark", cb_source[0], tmp_path / out, OPTS, progress=False, name=name)
    assert not (tmp_path / out).exists()


def test_catalogue_datasets_keep_their_key(tmp_path):
    with pytest.raises(DataError, match="catalogue dataset 'demo' is always named 'demo'"):
        build("demo", tmp_path, tmp_path / "mine", OPTS, progress=False, name="mine")


def test_cli_build_names_and_refuses_the_clashing_default(cb_source, tmp_path, capsys):
    root = cb_source[0]
    assert main(["data", "build", "--dataset", "clip_benchmark", "--root", str(root), "--out",
                 str(tmp_path / "clip_benchmark"), "--image-size", "16", "--quiet"]) == 1
    assert "is a catalogue key" in capsys.readouterr().err
    assert main(["data", "build", "--dataset", "clip_benchmark", "--root", str(root), "--out",
                 str(tmp_path / "clip_benchmark"), "--name", "cars", "--image-size", "16", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("built cars (clip_benchmark, fast images)")
    assert open_dataset(tmp_path / "clip_benchmark").key == "cars"


def _info(path, capsys) -> list[str]:
    assert main(["data", "info", str(path)]) == 0
    return capsys.readouterr().out.splitlines()


VAL_DRAWN = "val: none built; drawn from the train items a K-shot draw leaves (min(K, 4) per class)"


def test_info_describes_a_clip_benchmark_build_without_val(cb_source, tmp_path, capsys):
    build("clip_benchmark", cb_source[0], tmp_path / "shapes", OPTS, progress=False)
    lines = _info(tmp_path / "shapes", capsys)
    assert lines == ["shapes (clip_benchmark): 3 classes, template 'a photo of a {}.', fast images",
                     "train: 12 samples in 1 shard(s)", "        4  circle", "        4  square", "        4  star",
                     VAL_DRAWN,
                     "test: 6 samples in 1 shard(s)", "        2  circle", "        2  square", "        2  star"]


def _imagefolder(root, splits):
    n = 0
    for split, per_class in splits.items():
        for c, k in per_class.items():
            for i in range(k):
                make_image((root / split / c if split else root / c) / f"{i}.png", n)
                n += 1
    return root


def _imagenet(data):
    for folder, k in (("train", 3), ("val", 2)):
        for w in ("n01", "n02"):
            for i in range(k):
                make_image(data / "imagenet" / "images" / folder / w / f"{i}.jpg", i)
    (data / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    return data


def _imagenet_r(data):
    _imagenet(data)
    for i in range(3):
        make_image(data / "imagenet-rendition" / "imagenet-r" / "n02" / f"{i}.jpg", i)
    return data


FLAT_SPLIT = ("split: a flat folder (ROOT/<class>/) is split per class into 50% train, 20% val, 30% test "
              "(Dassl's read_and_split_data), shuffled with a seed made of the folder and class names")


def test_build_says_how_a_flat_folder_was_split(tmp_path, capsys):
    flat = _imagefolder(tmp_path / "pics", {"": {"cat": 10, "dog": 10}})
    assert main(["data", "build", "--dataset", "imagefolder", "--root", str(flat), "--out", str(tmp_path / "pets"),
                 "--image-size", "16", "--quiet"]) == 0
    assert FLAT_SPLIT in capsys.readouterr().out.splitlines()
    split = _imagefolder(tmp_path / "split", {"train": {"a": 3}, "test": {"a": 1}})
    assert main(["data", "build", "--dataset", "imagefolder", "--root", str(split), "--out", str(tmp_path / "sp"),
                 "--image-size", "16", "--quiet"]) == 0
    assert "split:" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["folder_flat", "folder_no_val", "imagenet", "imagenet_r"])
def test_info_describes_every_source_kind(tmp_path, capsys, kind):
    out = tmp_path / "built"
    if kind == "folder_flat":
        build("imagefolder", _imagefolder(tmp_path / "pics", {"": {"cat": 10, "dog": 10}}), out, OPTS, progress=False)
        expect = ["built (imagefolder): 2 classes, template 'a photo of a {}.', fast images",
                  "train: 10 samples in 1 shard(s)", "        5  cat", "        5  dog",
                  "val: 4 samples in 1 shard(s)", "        2  cat", "        2  dog",
                  "test: 6 samples in 1 shard(s)", "        3  cat", "        3  dog", FLAT_SPLIT]
    elif kind == "folder_no_val":
        build("imagefolder", _imagefolder(tmp_path / "pics", {"train": {"a": 3, "b": 2}, "test": {"a": 1, "b": 1}}),
              out, OPTS, progress=False)
        expect = ["built (imagefolder): 2 classes, template 'a photo of a {}.', fast images",
                  "train: 5 samples in 1 shard(s)", "        3  a", "        2  b", VAL_DRAWN,
                  "test: 2 samples in 1 shard(s)", "        1  a", "        1  b"]
    elif kind == "imagenet":
        build("imagenet", _imagenet(tmp_path / "DATA"), out, OPTS, progress=False)
        expect = ["imagenet: 2 classes, template 'a photo of a {}.', fast images",
                  "train: 6 samples in 1 shard(s)", "        3  tench", "        3  goldfish", VAL_DRAWN,
                  "test: 4 samples in 1 shard(s)", "        2  tench", "        2  goldfish"]
    else:
        build("imagenet_r", _imagenet_r(tmp_path / "DATA"), out, OPTS, progress=False)
        expect = ["imagenet_r: 1 classes, template 'a photo of a {}.', fast images",
                  "test: 3 samples in 1 shard(s)", "        3  goldfish"]
    assert _info(out, capsys) == expect


# --- exact mode -------------------------------------------------------------------------------------------


def _photos(root):
    """Originals of the kinds users have: a big JPEG, a portrait PNG, a palette GIF (converted to RGB as
    CoOp's loader does), in split folders."""
    rng = np.random.default_rng(3)
    originals = {}
    for split, names in (("train", ("a", "b")), ("test", ("a", "b"))):
        for c in names:
            for i, (size, ext) in enumerate((((300, 200), "jpg"), ((180, 260), "png"), ((240, 240), "gif"))):
                p = root / split / c / f"{i}.{ext}"
                p.parent.mkdir(parents=True, exist_ok=True)
                coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                img = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
                (img.convert("P") if ext == "gif" else img).save(p, **({"quality": 95} if ext == "jpg" else {}))
                originals[split, f"{c}/{i}.{ext}"] = p
    return originals


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    base = tmp_path_factory.mktemp("photos")
    originals = _photos(base / "pics")
    build("imagefolder", base / "pics", base / "exact", BuildOptions(image_size=224, exact=True), progress=False)
    build("imagefolder", base / "pics", base / "fast", BuildOptions(image_size=224), progress=False)
    return base, originals


def _coop_test_transform():
    from torchvision import transforms as T

    return T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def _loaded(ds, split, train=False, seed=1):
    sub = ds.select(split)
    xs = [x for x, _ in make_loader(sub, train=train, batch_size=2, image_size=224, mean=MEAN, std=STD, seed=seed)]
    return sub, torch.cat(xs)


def test_exact_mode_test_images_are_coops_transform_of_the_original_file(photos):
    base, originals = photos
    exact, fast = open_dataset(base / "exact"), open_dataset(base / "fast")
    assert exact.image_mode == "exact" and exact.info["image_mode"] == "exact" and fast.image_mode == "fast"
    assert exact.info["train_size"] is None
    sub, x = _loaded(exact, "test")
    tf = _coop_test_transform()
    paths = dict(zip(exact.manifest.column("key").to_pylist(), exact.manifest.column("path").to_pylist()))
    ref = torch.stack([tf(Image.open(originals["test", paths[k]]).convert("RGB")) for k in sub.keys])
    assert x.shape == (6, 3, 224, 224) and torch.equal(x, ref)  # bit for bit
    # The shards hold the original files' bytes.
    for i, data in read_by_range(sub, range(len(sub))):
        assert data == originals["test", paths[sub.keys[i]]].read_bytes()
    # Fast mode: test images were pre-cropped and re-encoded, so its pixels differ from CoOp's.
    fsub, fx = _loaded(fast, "test")
    assert fsub.keys == sub.keys
    assert (fx - ref).abs().max() > 0.05 and (fx - ref).abs().mean() > 1e-3


def test_exact_mode_train_images_are_torchvisions_random_resized_crop_of_the_original(photos):
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode, Normalize

    base, originals = photos
    exact = open_dataset(base / "exact")
    paths = dict(zip(exact.manifest.column("key").to_pylist(), exact.manifest.column("path").to_pylist()))
    sub = exact.select("train")
    loader = make_loader(sub, train=True, batch_size=6, image_size=224, mean=MEAN, std=STD, seed=5, epoch=2)
    (x, _), = list(loader)
    order = loader.dataset.indices(0)
    for j, i in enumerate(order):
        img = Image.open(originals["train", paths[sub.keys[i]]]).convert("RGB")
        rng = random.Random(sample_seed(5, 2, sub.keys[i]))
        left, top, right, bottom = crop_box(*img.size, rng)
        ref = F.resized_crop(img, top, left, bottom - top, right - left, [224, 224], InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            ref = F.hflip(ref)
        assert torch.equal(x[j], Normalize(MEAN, STD)(F.to_tensor(ref)))


def test_exact_mode_streams_any_image_format_and_keeps_the_checks(photos):
    base, _ = photos
    exact = open_dataset(base / "exact")
    # Whole-split evaluation streams the shards (members named .jpg, .png, .gif) rather than reading ranges.
    sub = exact.select("test")
    loader = make_loader(sub, train=False, batch_size=4, image_size=64, mean=MEAN, std=STD)
    assert not loader.dataset._sparse(0, len(sub))
    assert sum(len(x) for x, _ in loader) == 6


# --- a spec that names user datasets ----------------------------------------------------------------------

SPEC = """
name: own_data
protocol: base2new
report: base2new
data: {root: %s, datasets: [shapes, shapes_exact], shots: 2}
base:
  backbone: {name: hisf-tiny, pretrained: null}
  train: {preset: paper, epochs: 1, batch_size: 2, precision: fp32, warmup_epochs: 0, eval_batch_size: 16}
  device: cpu
rows:
  - {name: HISF, method: {name: hisf, depth: 2}}
"""


def test_a_spec_naming_user_datasets_by_folder_trains_each(cb_source, tmp_path):
    """Two CLIP_benchmark builds named by their folders (one exact) in one spec: every trial opens its own
    dataset (no "holds dataset 'clip_benchmark', expected 'shapes'") and reports its image mode."""
    from hisf.engine import run_trial
    from orchestrator.spec import load_spec
    from orchestrator.trials import expand_sweep

    data = tmp_path / "data"
    build("clip_benchmark", cb_source[0], data / "shapes", BuildOptions(image_size=32), progress=False)
    build("clip_benchmark", cb_source[0], data / "shapes_exact", BuildOptions(image_size=32, exact=True), progress=False)
    (tmp_path / "spec.yaml").write_text(SPEC % data)
    trials = expand_sweep(load_spec(tmp_path / "spec.yaml"), tmp_path / "work")
    assert [t.dataset for t in trials] == ["shapes", "shapes_exact"]

    class Seen:
        def on_trial_start(self, info):
            self.info = info

    for t, mode in zip(trials, ("fast", "exact")):
        seen = Seen()
        result = run_trial(t.config, callbacks=[seen])
        assert {k: seen.info[k] for k in ("image_mode", "dataset", "bad_images_left_out")} == {
            "image_mode": mode, "dataset": t.dataset, "bad_images_left_out": 0}
        assert 0.0 <= result["base_acc"] <= 100.0 and 0.0 <= result["novel_acc"] <= 100.0


def test_info_and_engine_errors_speak_of_names_and_modes(photos, tmp_path, capsys):
    from hisf.config import ConfigError, TrialConfig
    from hisf.engine.distributed import DistEnv
    from hisf.engine.trial_data import open_trial_data

    base, _ = photos
    assert _info(base / "exact", capsys)[0] == "exact (imagefolder): 2 classes, template 'a photo of a {}.', exact images"
    cfg = TrialConfig.from_dict({"protocol": "base2new", "backbone": {"name": "hisf-tiny", "pretrained": None},
                                 "method": {"name": "coop"}, "data": {"root": str(tmp_path), "dataset": "my_cars"},
                                 "output_dir": str(tmp_path / "o"), "device": "cpu"})
    with pytest.raises(ConfigError, match=r"no built dataset 'my_cars' .* --dataset imagefolder\|clip_benchmark "
                                          r"--root YOUR_FOLDER --name my_cars --out"):
        open_trial_data(cfg, DistEnv(0, 1, 0, torch.device("cpu"), False))
