"""`hisf-bench data demo/build/info/list` through the top-level command line, as a user runs them."""

from __future__ import annotations

import json

import numpy as np

from orchestrator.cli import main


def test_demo_build_info_round_trip(tmp_path, capsys):
    data, out = tmp_path / "DATA", tmp_path / "built" / "demo"
    assert main(["data", "demo", "--out", str(data), "--classes", "4", "--train", "5", "--val", "2", "--test", "3"]) == 0
    split = json.loads((data / "demo" / "split_zhou_Demo.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [20, 8, 12]
    assert main(["data", "build", "--dataset", "demo", "--root", str(data), "--out", str(out), "--image-size", "32",
                 "--jobs", "2", "--quiet"]) == 0
    assert "built demo" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "demo: 4 classes, template 'a photo of a {}.', fast images"
    assert "train: 20 samples in 1 shard(s)" in lines and "test: 12 samples in 1 shard(s)" in lines
    assert lines.count("        5  red circle") == 1 and lines.count("        3  cyan bars") == 0
    assert lines.count("        3  yellow cross") == 1
    # The demo's classes come with descriptions (CoPrompt's `{class: [sentences]}`), one entry per built class.
    descriptions = json.loads((data / "descriptions" / "demo_prompt.json").read_text())
    assert list(descriptions) == ["red circle", "green square", "blue triangle", "yellow cross"]
    assert all(len(s) == 3 and all(name in x for x in s) for name, s in descriptions.items())
    assert len({x for s in descriptions.values() for x in s}) == 12


def test_demo_classes_are_visually_separable(tmp_path):
    """A nearest-class-mean classifier on raw pixels beats chance by far: the demo task is learnable."""
    from data_shards import make_loader, open_dataset

    main(["data", "demo", "--out", str(tmp_path / "DATA"), "--train", "8", "--val", "1", "--test", "6"])
    main(["data", "build", "--dataset", "demo", "--root", str(tmp_path / "DATA"), "--out", str(tmp_path / "demo"),
          "--image-size", "32", "--quiet"])
    ds = open_dataset(tmp_path / "demo")
    feats = {}
    for split in ("train", "test"):
        xs, ys = zip(*make_loader(ds.select(split), train=False, batch_size=16, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
        x = np.concatenate([b.numpy() for b in xs])
        # Mean colour of each image's most saturated tenth of pixels (the shape, not the grey background).
        px = x.reshape(len(x), 3, -1)
        sat = px.max(1) - px.min(1)
        top = np.argsort(-sat, axis=1)[:, : px.shape[-1] // 10]
        feats[split] = (np.take_along_axis(px, top[:, None, :], 2).mean(-1), np.concatenate([b.numpy() for b in ys]))
    (xtr, ytr), (xte, yte) = feats["train"], feats["test"]
    means = np.stack([xtr[ytr == c].mean(0) for c in range(6)])
    pred = np.argmin(((xte[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == yte).mean() > 0.9


def test_unknown_dataset_is_an_error_exit(tmp_path, capsys):
    assert main(["data", "build", "--dataset", "nope", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "dataset 'nope': unknown key" in capsys.readouterr().err
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(k in listed for k in ("imagenet_r", "clip_benchmark", "imagefolder", "demo"))
