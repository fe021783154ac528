"""The train-step benchmark runs (tiny, CPU) and its three formulations compute the same first-step loss."""

from __future__ import annotations

import json

import pytest


def test_train_step_benchmark_tiny(tmp_path):
    from benchmarks.train_step import main, prompt_methods

    out = tmp_path / "bench.json"
    assert main(["--tiny", "--steps", "1", "--warmup", "1", "--classes", "7", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    check = report["loss_check"]
    # Truncating the text encoder to the prompts' positions must not change the loss (causal mask), and our
    # maple must compute MaPLe's reference loss.
    assert check["ours_fast"] == pytest.approx(check["ours_eager_77"], abs=1e-5)
    assert check["ours_fast"] == pytest.approx(check["maple_reference"], abs=1e-5)
    rows = {r["formulation"]: r for r in report["rows"]}
    # Every registered prompt method is timed by default (zeroshot and coop, the prompt-free and text-only
    # baselines, are not).
    assert {"maple", "hisf"} <= set(prompt_methods()) and not {"zeroshot", "coop"} & set(prompt_methods())
    assert set(rows) == {"maple_reference_fp32"} | {f"ours_{m}_fp32" for m in prompt_methods()}
    assert report["complete"] and [c["classes"] for c in report["loss_checks"]] == [7]
    for r in rows.values():
        assert r["first_loss"] > 0
        assert r["batch"] == 4 and r["classes"] == 7 and r["ms_per_step"] > 0
        assert r["images_per_s"] == pytest.approx(4000 / r["ms_per_step"])
