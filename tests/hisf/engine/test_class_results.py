"""Confusion counts from the evaluation forward (every member, shared and per-member loaders, padding), accuracy as
their trace over the total, and the per-class artifacts (JSON, PNG) they are written as."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hisf.class_results import class_results, read_class_results, worst_classes, write_class_results
from hisf.confusion_plot import LABELLED_CLASSES
from hisf.engine.distributed import DistEnv
from hisf.engine.evaluation import accuracy, confusion_counts, count_correct, score
from tests.hisf.engine.helpers import TinyPromptModel

CPU1 = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)


def _batches(n_batches: int, sizes=(5, 3), seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(sizes[i % len(sizes)], 3, 2, 2, generator=g),
             torch.randint(0, classes, (sizes[i % len(sizes)],), generator=g)) for i in range(n_batches)]


def _hand_count(pairs, k: int, c: int) -> list[list[list[int]]]:
    """Confusion counts by hand: pairs of (member, true label, prediction)."""
    out = [[[0] * c for _ in range(c)] for _ in range(k)]
    for m, t, p in pairs:
        out[m][t][p] += 1
    return out


def test_shared_counts_equal_a_hand_count_of_each_members_logits():
    model = TinyPromptModel(n_classes=3, seed=4, members=3)
    batches = _batches(4)
    pairs = []
    with torch.no_grad():
        for images, labels in batches:
            logits = model(images, shared=True)  # [K, B, C]
            for m in range(3):
                pairs += [(m, int(t), int(p)) for t, p in zip(labels, logits[m].argmax(-1))]
    conf = confusion_counts(model, batches, torch.device("cpu"), n_classes=3)
    assert conf.dtype == torch.int64 and conf.shape == (3, 3, 3)
    assert conf.tolist() == _hand_count(pairs, 3, 3)
    # The members differ (their own prompts), so their matrices are their own.
    assert len({str(conf[m].tolist()) for m in range(3)}) > 1
    # Accuracy is the trace over the total, exactly as counting the correct predictions gives it.
    total = sum(len(labels) for _, labels in batches)
    correct = [sum(1 for mm, t, p in pairs if mm == m and t == p) for m in range(3)]
    model.classnames = ("a", "b", "c")  # the class set the engine's models carry
    assert accuracy(model, batches, CPU1) == [100.0 * c / total for c in correct]
    got_correct, totals = count_correct(model, batches, torch.device("cpu"))
    assert got_correct.tolist() == correct and totals == [total] * 3


def test_per_member_loaders_pad_and_leave_out_missing_members():
    """One loader per member, of different lengths (and None for a member with nothing to score): padding never counts."""
    model = TinyPromptModel(n_classes=4, seed=1, members=3)
    model.classnames = ("a", "b", "c", "d")
    loaders = [_batches(3, (4, 2), seed=1, classes=4), None, _batches(1, (3,), seed=2, classes=4)]
    pairs = []
    with torch.no_grad():
        for m, loader in enumerate(loaders):
            for images, labels in loader or ():
                # Member m alone on its images: its slice of a member-major forward of [K·b] images.
                logits = model(torch.cat([images] * 3))[m]
                pairs += [(m, int(t), int(p)) for t, p in zip(labels, logits.argmax(-1))]
    scores = score(model, loaders, CPU1, shared=False, metric="val_acc", dataset="demo")
    assert scores.confusion.tolist() == _hand_count(pairs, 3, 4)
    assert scores.confusion[1].sum() == 0 and scores.confusion[0].sum() == 4 + 2 + 4 and scores.confusion[2].sum() == 3
    acc = scores.accuracy()
    assert acc[0] == 100.0 * sum(1 for m, t, p in pairs if m == 0 and t == p) / 10 and np.isnan(acc[1])
    assert (scores.metric, scores.dataset, scores.classnames) == ("val_acc", "demo", ("a", "b", "c", "d"))


def test_an_empty_split_is_refused():
    model = TinyPromptModel(members=1)
    model.classnames = ("a", "b", "c")
    with pytest.raises(ValueError, match="empty on every rank"):
        score(model, [], CPU1)


def test_the_record_holds_per_class_accuracy_counts_and_the_matrix(tmp_path):
    conf = torch.tensor([[3, 1, 0], [0, 0, 2], [0, 0, 0]])
    rec = class_results(conf, ("cat", "dog", "eel"), "novel_acc", "demo")
    assert rec["split"] == "novel" and rec["metric"] == "novel_acc" and rec["dataset"] == "demo"
    assert rec["confusion"] == conf.tolist() and rec["support"] == [4, 2, 0] and rec["correct_per_class"] == [3, 0, 0]
    assert rec["per_class_accuracy"] == [75.0, 0.0, None]  # eel: no image in the split
    assert rec["accuracy"] == 50.0 and rec["mean_class_accuracy"] == 37.5 and (rec["correct"], rec["total"]) == (3, 6)
    assert worst_classes(rec, 5) == [1, 0]
    with pytest.raises(ValueError, match="2-row confusion count for 3 class names"):
        class_results(conf[:2], ("cat", "dog", "eel"), "acc")
    write_class_results(tmp_path, conf, ("cat", "dog", "eel"), "target/other", "other")
    assert read_class_results(tmp_path / "eval" / "target" / "other.json")["split"] == "target/other"
    assert Image.open(tmp_path / "eval" / "target" / "other.png").format == "PNG"
    (tmp_path / "junk.json").write_text(json.dumps({"classnames": []}))
    with pytest.raises(ValueError, match="junk.json: not a per-class results file"):
        read_class_results(tmp_path / "junk.json")


@pytest.mark.parametrize("classes", [12, LABELLED_CLASSES + 50])
def test_heatmaps_stay_legible(tmp_path, classes):
    """Up to LABELLED_CLASSES every class is named; beyond, the matrix plus the worst classes charted (a wide figure)."""
    rng = np.random.default_rng(classes)
    conf = rng.integers(0, 3, (classes, classes)) + np.diag(rng.integers(0, 20, classes))
    write_class_results(tmp_path, conf, [f"class {i}" for i in range(classes)], "acc", "many")
    img = Image.open(tmp_path / "eval" / "all.png")
    assert img.format == "PNG"
    w, h = img.size
    if classes <= LABELLED_CLASSES:
        assert 450 <= h <= 2200 and len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50
    else:
        assert (w, h) == (1700, 950)
