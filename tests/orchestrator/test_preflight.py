"""Pre-flight on the driver: data, shots and backbone weights checked before Ray starts, and by `--dry-run`;
multi-node clusters refused when stores or folders are on this machine only."""

import io
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from hisf.config import BackboneConfig
from orchestrator import preflight
from orchestrator.cli import main as cli_main
from orchestrator.context import Options
from orchestrator.spec import load_spec
from orchestrator.trials import expand_sweep
from tests.orchestrator.helpers import DEMO_SPEC, demo_raw, write_spec

ROWS = [{"name": "CoOp", "method": {"name": "coop"}}]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """The hub's host never resolves (`.invalid`), with or without network: nothing is downloaded here."""
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)


def spec_with(tmp_path, demo_root, backbone=None, **kw) -> Path:
    p = write_spec(tmp_path / "s.yaml", demo_root, rows=ROWS, name="pre", **kw)
    if backbone:
        raw = yaml.safe_load(p.read_text())
        raw["base"]["backbone"] = backbone
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def test_tag_without_cache_fails_fast_before_ray_with_how_to_pass_a_checkpoint(tmp_path, demo_root, capsys):
    spec = spec_with(tmp_path, demo_root, backbone={"name": "ViT-B-16", "pretrained": "openai"})
    wd, cache = tmp_path / "wd", tmp_path / "cache"
    started = time.monotonic()
    rc = cli_main(["sweep", str(spec), "--workdir", str(wd), "--weights-cache", str(cache)])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 2, err
    assert elapsed < 60, elapsed  # imports and data checks included; the hub client alone retries for ~50 s
    assert "1 problem before any trial could start:" in err  # one error, not one per trial
    assert f"weights 'openai' of 'ViT-B-16' are not cached in {cache.resolve()}" in err
    assert "no connection to hub.invalid" in err
    assert "`backbone.pretrained: /path/to/file.pt`" in err and "--weights-cache DIR" in err
    import ray

    assert not ray.is_initialized()
    assert not (wd / "mlflow.db").exists() and not (wd / "runs").exists()  # no MLflow run, no trial folder

    from hisf.model.backbone import BackboneError, fetch_weights

    started = time.monotonic()
    with pytest.raises(BackboneError, match="no connection to hub.invalid"):
        fetch_weights(BackboneConfig(name="ViT-B-16", pretrained="openai", cache_dir=str(cache)))
    assert time.monotonic() - started < 10  # one connection probe, no retries


def write_hub_cache(cache: Path, repo: str, filename: str, state_dict: dict) -> Path:
    """A file where huggingface_hub's hf_hub_download leaves it: models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


@pytest.fixture()
def tiny_tags(monkeypatch):
    """Two pretrained tags of the tiny config in open_clip's registry: one on the hub, one at a URL."""
    import open_clip.pretrained as op

    tags = {"hubtag": {"url": "", "hf_hub": "hisf-test/tiny-clip/"},
            "urltag": {"url": "https://weights.invalid/files/hisf-tiny-w.pt", "hf_hub": ""}}
    monkeypatch.setitem(op._PRETRAINED, "hisf-tiny", tags)
    return tags


def tiny_state_dict(seed: int) -> dict:
    from open_clip.model import CLIP

    from hisf.model.backbone import MODEL_CONFIG_DIR

    torch.manual_seed(seed)
    return CLIP(**json.loads((MODEL_CONFIG_DIR / "hisf-tiny.json").read_text())).state_dict()


def test_cached_tag_in_weights_cache_resolves_without_network(tmp_path, demo_root, tiny_tags, capsys):
    from hisf.model.backbone import fetch_weights, load_backbone

    cache = tmp_path / "cache"
    sd = tiny_state_dict(5)
    hub_file = write_hub_cache(cache, "hisf-test/tiny-clip", "open_clip_model.safetensors", sd)
    url_sd = tiny_state_dict(6)
    torch.save(url_sd, cache / "hisf-tiny-w.pt")  # open_clip's URL cache: CACHE/<basename of the URL>

    hub = BackboneConfig(name="hisf-tiny", pretrained="hubtag", cache_dir=str(cache))
    assert fetch_weights(hub) == str(hub_file)
    assert fetch_weights(BackboneConfig(name="hisf-tiny", pretrained="urltag", cache_dir=str(cache))) == str(cache / "hisf-tiny-w.pt")
    key = "text_projection"
    assert torch.equal(load_backbone(hub).model.state_dict()[key], sd[key])
    url = load_backbone(BackboneConfig(name="hisf-tiny", pretrained="urltag", cache_dir=str(cache)))
    assert torch.equal(url.model.state_dict()[key], url_sd[key])

    # The CLI: --weights-cache reaches the pre-flight (dry run) and every trial's config.
    spec = spec_with(tmp_path, demo_root, backbone={"name": "hisf-tiny", "pretrained": "hubtag"})
    assert cli_main(["sweep", str(spec), "--dry-run", "--workdir", str(tmp_path / "wd"),
                     "--weights-cache", str(cache)]) == 0
    assert f"preflight: weights hisf-tiny/hubtag: {hub_file}" in capsys.readouterr().out
    trials = expand_sweep(preflight.with_weights_cache(load_spec(spec), str(cache)), tmp_path / "wd")
    assert trials and all(t.config.backbone.cache_dir == str(cache.resolve()) for t in trials)
    assert load_spec(spec).hash == preflight.with_weights_cache(load_spec(spec), str(cache)).hash
    # Without the cache flag the same tag is looked up in open_clip's default cache: not there, one error.
    assert cli_main(["sweep", str(spec), "--dry-run", "--workdir", str(tmp_path / "wd")]) == 2
    assert "weights 'hubtag' of 'hisf-tiny' are not cached" in capsys.readouterr().err


def test_missing_checkpoint_wrong_dataset_and_short_shots_are_one_error(tmp_path, demo_root, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root / "demo", root / "shapes")  # a dataset built as 'demo', listed as 'shapes'
    shutil.copytree(demo_root / "demo", root / "demo")
    raw = yaml.safe_load(spec_with(tmp_path, root, backbone={"name": "hisf-tiny",
                                                             "pretrained": str(tmp_path / "nope.pt")}).read_text())
    raw["data"].update(datasets=["demo", "shapes", "flowers"], shots=1000)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    counts = __import__("data_shards").open_dataset(root / "demo").counts()["train"]
    for argv in (["sweep", str(p), "--dry-run"], ["final", str(p)]):
        assert cli_main(argv + ["--workdir", str(tmp_path / "wd")]) == 2
        err = capsys.readouterr().err
        assert "4 problems before any trial could start" in err, err
        assert "data.datasets[1]: " in err and "holds dataset 'demo', expected 'shapes'" in err
        assert f"data.datasets[2]: no built dataset 'flowers' at {root / 'flowers'}" in err
        assert "hisf-bench data build --dataset flowers" in err
        # base2new trains on the base half: the first 3 of the demo's 6 classes, each named with its count
        base = ["red circle", "green square", "blue triangle"]
        listed = ", ".join(f"{n!r} ({counts[n]})" for n in base)
        assert f"data.shots: 1000 shots per class, but 3 of the 3 base classes of 'demo' have fewer train images: {listed}" in err
        assert f"backbone.pretrained: {str(tmp_path / 'nope.pt')!r} is neither an existing checkpoint file" in err
    assert not (tmp_path / "wd" / "mlflow.db").exists()


def test_preflight_passes_on_good_data_and_reports_what_trials_read(tmp_path, demo_root):
    import io

    spec = load_spec(spec_with(tmp_path, demo_root))
    out = io.StringIO()
    preflight.check(spec, out=out)
    assert "preflight: demo: 12 train images (4 shots x 3 base classes), 12 validation" in out.getvalue()


def opts(tmp_path, **kw):
    return Options(workdir=str(tmp_path / "wd"), out=None, **kw).resolved()


def test_cluster_storage_checks_name_the_flags(tmp_path, demo_root, monkeypatch):
    spec = load_spec(spec_with(tmp_path, demo_root))
    search = yaml.safe_load((Path(spec.path)).read_text())
    search["rows"][0]["search"] = True
    search["search"] = {"n_trials": 2, "params": {"method.lambda_le": {"low": 0.0, "high": 1.0}}}
    (tmp_path / "se.yaml").write_text(yaml.safe_dump(search))
    searched = load_spec(tmp_path / "se.yaml")

    preflight.check_cluster(searched, opts(tmp_path), alive_nodes=1)  # one node: anything goes
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_cluster(searched, opts(tmp_path), alive_nodes=2)
    msg = str(e.value)
    assert "the Ray cluster has 2 nodes" in msg
    for flag in ("`--tracking-uri http://HOST:5000`", "`--optuna-storage postgresql://USER@HOST/DB`",
                 "`--workdir /shared/...`", "data.root", "`--shared-storage`"):
        assert flag in msg, flag
    # Declared shared: one short note naming what is taken as shared (not the advice to pass the flag the user
    # passed), printed once however many stages check the cluster.
    monkeypatch.setattr(preflight, "_NOTED", set())
    out = io.StringIO()
    for _ in range(2):
        preflight.check_cluster(searched, opts(tmp_path, shared_storage=True), alive_nodes=2, out=out)
    (note,) = out.getvalue().splitlines()
    assert note.startswith("preflight: 2 Ray nodes; as --shared-storage says, every node sees the SQLite tracking "
                           "store, the SQLite Optuna storage, --workdir "), note
    assert "pass" not in note and len(note) < 300, note

    # Servers for the stores and folders on a network file system: nothing left to refuse.
    monkeypatch.setattr(preflight, "_fs_type", lambda path: "nfs4")
    o = Options(workdir=str(tmp_path / "wd"), tracking_uri="http://mlflow:5000",
                optuna_storage="postgresql://u@db/optuna").resolved()
    assert preflight.storage_problems(searched, o) == []
    # No search stage: the Optuna storage is not used, so a SQLite URL there is no problem.
    o2 = Options(workdir=str(tmp_path / "wd"), tracking_uri="http://mlflow:5000").resolved()
    assert preflight.storage_problems(spec, o2) == []
    assert len(preflight.storage_problems(searched, o2)) == 1


def test_fs_type_reads_the_longest_mount_prefix():
    assert preflight._fs_type(Path("/proc/self")) == "proc"
    assert preflight._fs_type(Path("/")) != ""


def test_dry_run_of_the_demo_checks_and_leaves_unbuilt_demo_data_to_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo's data.root (hisf-bench/data) is relative: nothing built here yet
    spec = DEMO_SPEC
    assert cli_main(["run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"preflight: data.datasets[0]: demo dataset 'demo' is built under {tmp_path / 'hisf-bench' / 'data'} " \
           "when the run starts" in out
    assert "total: 19 trials" in out  # 5 rows x 3 seeds + 4 search trials
    assert not (tmp_path / "hisf-bench").exists()  # a dry run builds and writes nothing


@pytest.mark.parametrize("spoil, message", [
    (lambda d: (d / "manifest.parquet").write_bytes(b""), "manifest.parquet: not a readable Parquet manifest"),
    (lambda d: (d / "info.json").write_text("[]"), "info.json: expected a JSON object, got a list"),
    (lambda d: (d / "info.json").write_text("{oops"), "info.json: not valid JSON"),
    (lambda d: (d / "info.json").write_text(json.dumps({k: v for k, v in json.loads((d / "info.json").read_text())
                                                        .items() if k != "template"})), "info.json: missing 'template'"),
])
def test_dry_run_and_run_name_a_spoilt_dataset_file(tmp_path, demo_root, capsys, spoil, message):
    """The dry run used to print a traceback (HiCroPL's descriptions check opens the dataset first)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root / "demo", root / "demo")
    spoil(root / "demo")
    raw = demo_raw()
    raw["data"].update(root=str(root), demo=False)
    (tmp_path / "desc").mkdir()
    from data_shards.demo import write_descriptions

    raw["rows"][4]["method"]["descriptions"] = str(write_descriptions(tmp_path / "desc"))
    p = tmp_path / "spoilt.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    for argv in (["run", str(p), "--dry-run"], ["sweep", str(p)]):
        assert cli_main(argv + ["--workdir", str(tmp_path / "wd")]) == 2
        err = capsys.readouterr().err
        assert f"{root / 'demo'}" in err and message in err, err
    assert not (tmp_path / "wd" / "mlflow.db").exists()


def test_a_pretrained_file_that_is_not_a_checkpoint_is_refused_before_ray(tmp_path, demo_root, capsys):
    notes = tmp_path / "weights.pt"
    notes.write_text("not weights")
    spec = spec_with(tmp_path, demo_root, backbone={"name": "hisf-tiny", "pretrained": str(notes)})
    assert cli_main(["sweep", str(spec), "--dry-run", "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert "1 problem before any trial could start" in err
    assert re.search(f"  - backbone.pretrained: .*{notes}", err), err  # the reader's own words say what it holds
