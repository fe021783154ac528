"""The MLflow UI (the pip-installed server and its JS bundle) in headless Chromium: our experiment opens on the
runs table, with each stage's parent run and, expanded, child runs whose names say what they are."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.context import Options, stage_context
from orchestrator.spec import load_spec
from orchestrator.status import mlflow_ui_link
from orchestrator.tracking import Tracker, TrialRun
from orchestrator.trial_callback import trial_tags
from orchestrator.trials import expand_sweep
from tests.orchestrator.helpers import free_port, mlflow_server_at, stop_group, wait_for, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BIN = Path(sys.executable).parent


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except OSError:
        return None, b""


@pytest.fixture()
def mlflow_server(tmp_path):
    with mlflow_server_at(tmp_path / "server", workers=1) as url:
        yield url


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): navigate, run JS."""

    def __init__(self, profile: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        assert exe, "headless Chromium is required (Debian: apt-get install -y chromium)"
        self.port = free_port()
        self.profile = profile
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--window-size=1600,1000",
             f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def ws_url(self) -> str:
        def page():
            status, body = _get(f"http://127.0.0.1:{self.port}/json/list")
            pages = [t for t in json.loads(body or b"[]") if t.get("type") == "page"] if status == 200 else []
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        return wait_for(page, 60, 0.2, "Chromium's DevTools endpoint")

    async def session(self, script):
        import aiohttp

        async with aiohttp.ClientSession() as http, http.ws_connect(self.ws_url(), max_msg_size=0) as ws:
            counter = iter(range(1, 1_000_000))

            async def call(method, **params):
                i = next(counter)
                await ws.send_json({"id": i, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json(timeout=60)
                    if msg.get("id") == i:
                        assert "error" not in msg, msg
                        return msg.get("result", {})

            async def js(expr):
                r = await call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
                return r["result"].get("value")

            return await script(call, js)

    def close(self):
        stop_group(self.proc, marker=str(self.profile))


async def _wait_text(js, predicate, timeout=90.0):
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = await js("document.title + '\\n' + (document.body ? document.body.innerText : '')") or ""
        if predicate(text):
            return text
        await asyncio.sleep(0.5)
    raise AssertionError(f"page never showed what was expected; it shows:\n{text[:3000]}")


def test_experiment_opens_on_the_runs_table_with_parents_and_named_children(tmp_path, demo_root, mlflow_server):
    # Real trials of a spec with a grid axis, tracked to a real server as the orchestrator does (no training).
    spec_path = write_spec(tmp_path / "ui.yaml", demo_root, name="ui", seeds=(1, 2), rows=[
        {"name": "CoOp", "method": {"name": "coop"}}, {"name": "HISF", "method": {"name": "hisf"}}])
    d = yaml.safe_load(spec_path.read_text())
    d["grid"] = {"method.depth": [2]}  # within the tiny backbone's 3 layers (the spec refuses more)
    spec_path.write_text(yaml.safe_dump(d, sort_keys=False))
    spec = load_spec(spec_path)
    trials = expand_sweep(spec, tmp_path / "hisf-bench")
    tracker = Tracker(mlflow_server, spec.name)
    parent = tracker.stage_run("sweep", spec.hash, resume=False)
    ctx = stage_context(spec, Options(workdir=str(tmp_path / "hisf-bench"), tracking_uri=mlflow_server).resolved(), tracker.experiment_id, parent)
    for t in trials:
        run = TrialRun(mlflow_server, tracker.experiment_id, parent, t.trial_id, trial_tags(t, ctx),
                       t.config.flatten(), run_name=t.run_name)
        run.log_metrics({"hm": 50.0 + t.seed}, step=0)
        run.finish("finished")
    tracker.end_stage(parent)
    names = sorted(t.run_name for t in trials)
    assert names == [f"{row} · demo · seed {s} · depth=2" for row in ("CoOp", "HISF") for s in (1, 2)]

    link = mlflow_ui_link(mlflow_server, spec.name)
    assert link == f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
    browser = Browser(tmp_path / "chromium")

    async def script(call, js):
        await call("Page.enable")
        # The experiment's own page, as the printed link opens it (a fresh profile: no remembered UI state).
        await call("Page.navigate", url=link)
        text = await _wait_text(js, lambda t: "sweep" in t and "matching runs" in t)
        before = text
        # Expand the stage parent: its children are the trials.
        clicked = await js("Array.from(document.querySelectorAll("
                           "'button[data-component-id*=\"runnamecellrenderer\"]')).map(b => (b.click(), 1)).length")
        after = await _wait_text(js, lambda t: all(n in t for n in names))
        shot = await call("Page.captureScreenshot", format="png")
        return before, clicked, after, shot["data"]

    try:
        before, clicked, after, png = asyncio.run(browser.session(script))
    finally:
        browser.close()
    import base64

    (tmp_path / "runs_table.png").write_bytes(base64.b64decode(png))
    assert before.splitlines()[0].startswith("Runs - Experiment")  # the runs table, not the GenAI overview
    assert "Usage" not in before.splitlines()[:5] and "No traces" not in before
    assert clicked == 1  # one stage parent
    assert "5 matching runs" in after  # 1 parent + 4 children
    for n in names:
        assert after.count(n) == 1, n
