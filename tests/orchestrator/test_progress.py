"""While a stage runs: the progress line's numbers, Ray's output kept off the console, the CLI's help and version."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tomllib

from orchestrator import cli
from orchestrator.progress import StageProgress, ray_output_to_log
from orchestrator.results import FINAL_KEY, STATUS_KEY, group_result
from tests.support import ROOT


def _trial(tid: str, status: str | None = None, **metrics):
    """A Tune trial running a group of one member `tid`, done with `status` when given."""
    return _group(tid, {tid: {STATUS_KEY: status, **metrics}} if status else {tid: None})


def _group(tune_id: str, members: dict):
    """A Tune trial running a fused group: `members` trial id -> its final record (None: not done yet)."""
    done = all(r is not None for r in members.values())
    return SimpleNamespace(trial_id=tune_id, config={"group": {"members": [{"trial_id": t} for t in members]}},
                           last_result=group_result(members) if done else {})


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_line_counts_eta_and_best(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("orchestrator.progress.time.monotonic", clock)
    out = io.StringIO()
    p = StageProgress("search", 10, out, prior={"finished": 2, "pruned": 1}, metric="val_acc", best=40.0,
                      every=10.0, live=False)
    assert p.line() == ("[search] 2/10 finished, 0 running, 0 failed, 1 pruned · 0:00 elapsed · ETA ? · "
                        "best val_acc 40.00")
    for i in range(4):
        p.on_trial_start(0, [], _trial(f"t{i}"))
    clock.now += 60
    p.on_trial_complete(0, [], _trial("t0", "finished", val_acc=55.5))
    p.on_trial_complete(0, [], _trial("t1", "pruned", val_acc=70.0))  # a pruned value is not a result
    p.on_trial_error(0, [], _trial("t2"))
    # 3 done in 60 s in this run, 10 - 3 prior - 3 = 4 left: 80 s
    assert p.line() == ("[search] 3/10 finished, 1 running, 1 failed, 2 pruned · 1:00 elapsed · ETA 1:20 · "
                        "best val_acc 55.50")
    # A worker that died and is retried (max_failures) is counted as a retry, not as a finished or failed trial.
    p.on_trial_recover(0, [], _trial("t3"))
    assert p.line().startswith("[search] 3/10 finished, 1 running, 1 failed, 2 pruned, 1 retry · 1:00 elapsed")
    p.on_trial_recover(0, [], _trial("t3"))
    assert ", 2 retries · " in p.line()
    # A trial whose last report is not final (killed between reports) counts as failed.
    p.on_trial_complete(0, [], SimpleNamespace(trial_id="t3", config={"group": {"members": [{"trial_id": "t3"}]}},
                                               last_result={STATUS_KEY: "running", FINAL_KEY: False}))
    assert "1/10" not in p.line() and " 2 failed" in p.line() and "0 running" in p.line()


def test_progress_counts_the_members_of_fused_groups():
    out = io.StringIO()
    p = StageProgress("final", 5, out, metric="val_acc", every=10.0, live=False)
    p.on_trial_start(0, [], _group("g1", {"a": None, "b": None, "c": None}))
    p.on_trial_start(0, [], _group("g2", {"d": None, "e": None}))
    assert p.line().startswith("[final] 0/5 finished, 5 running, 0 failed, 0 pruned")
    p.on_trial_complete(0, [], _group("g1", {"a": {STATUS_KEY: "finished", "val_acc": 61.0},
                                             "b": {STATUS_KEY: "pruned", "val_acc": 90.0},
                                             "c": {STATUS_KEY: "failed"}}))
    assert p.line().startswith("[final] 1/5 finished, 2 running, 1 failed, 1 pruned") and "best val_acc 61.00" in p.line()
    p.on_trial_error(0, [], _group("g2", {"d": None, "e": None}))  # a group that errored: each member failed
    assert p.line().startswith("[final] 1/5 finished, 0 running, 3 failed, 1 pruned")


def test_plain_lines_are_rate_limited_and_live_lines_redraw_in_place(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("orchestrator.progress.time.monotonic", clock)
    out = io.StringIO()
    p = StageProgress("sweep", 3, out, every=10.0, live=False)
    p.on_trial_start(0, [], _trial("a"))  # first event: printed at once
    p.on_trial_start(0, [], _trial("b"))  # 0 s later: held back
    clock.now += 5
    p.on_trial_complete(0, [], _trial("a", "finished"))  # 5 s < every: held back
    clock.now += 6
    p.on_step_end(0, [])  # changed and 11 s since the last line: printed
    clock.now += 3
    p.on_step_end(0, [])  # nothing changed: quiet
    clock.now += 47  # 5 × every without a line: a heartbeat even with no change
    p.on_step_end(0, [])
    p.on_trial_complete(0, [], _trial("b", "finished"))  # held back (0 s since the heartbeat) ...
    p.close()  # ... until the stage ends
    p.close()
    assert out.getvalue().splitlines() == [
        "[sweep] 0/3 finished, 1 running, 0 failed, 0 pruned · 0:00 elapsed · ETA ?",
        "[sweep] 1/3 finished, 1 running, 0 failed, 0 pruned · 0:11 elapsed · ETA 0:22",
        "[sweep] 1/3 finished, 1 running, 0 failed, 0 pruned · 1:01 elapsed · ETA 2:02",
        "[sweep] 2/3 finished, 0 running, 0 failed, 0 pruned · 1:01 elapsed · ETA 0:30"]

    tty = io.StringIO()
    live = StageProgress("final", 2, tty, live=True)
    live.on_trial_start(0, [], _trial("a"))
    clock.now += 2
    live.on_trial_complete(0, [], _trial("a", "finished"))
    live.close()
    text = tty.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n") and text.count("\r") == 3  # start, completion, close
    assert text.rstrip().rsplit("\r", 1)[1] == "[final] 1/2 finished, 0 running, 0 failed, 0 pruned · 0:02 elapsed · ETA 0:02"


def test_ray_output_goes_to_the_log_and_progress_to_the_console(tmp_path, capfd):
    log = tmp_path / "logs" / "s-sweep.log"
    console_text = "[sweep] 1/2 finished"
    real = sys.__stdout__  # the process's fd 1, as in the CLI (pytest swaps sys.stdout for its own object)
    print("before", file=real, flush=True)
    with ray_output_to_log(real, log, verbose=False) as console:
        print("python chatter", file=real, flush=True)
        os.write(2, b"C++ chatter on fd 2\n")
        subprocess.run([sys.executable, "-c", "print('child process chatter')"], check=True)
        console.write(console_text + "\n")
    print("after", file=real, flush=True)
    out, err = capfd.readouterr()
    assert out.splitlines() == ["before", console_text, "after"] and err == ""
    kept = log.read_text()
    for line in ("python chatter", "C++ chatter on fd 2", "child process chatter"):
        assert line in kept
    assert console_text not in kept
    # --verbose: nothing is redirected, the log says where the output went.
    with ray_output_to_log(real, log, verbose=True):
        print("shown", file=real, flush=True)
    assert capfd.readouterr().out == "shown\n"
    assert log.read_text().count("====") == 2 and "--verbose" in log.read_text().splitlines()[-1]


def test_cli_without_arguments_lists_every_command_and_prints_its_version(capsys):
    assert cli.main([]) == 0
    text = capsys.readouterr().out
    for command in ("run", "sweep", "search", "final", "status", "report", "data", "train"):
        assert f"\n  {command} " in text, command
    assert "--version" in text
    assert cli.main(["--version"]) == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"hisf-bench {version}\n"
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    assert "--verbose" in capsys.readouterr().out


def test_status_offers_only_its_own_flags_and_report_names_the_optuna_flag_as_run_does(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["status", "-h"])
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"(--[a-z-]+)", help_text))
    assert flags == {"--help", "--tracking-uri", "--optuna-storage", "--workdir", "--full-read"}, flags
    with pytest.raises(SystemExit):
        cli.main(["report", "-h"])
    report_help = capsys.readouterr().out
    assert "--optuna-storage URL" in report_help and "--storage" not in report_help
    # The earlier name still works, hidden: both reach the same setting.
    from orchestrator.report import main as report_main

    for flag in ("--storage", "--optuna-storage"):
        code = report_main([str(ROOT / "experiments" / "demo.yaml"), "--workdir", str(tmp_path), flag,
                            f"sqlite:///{tmp_path}/none.db"])
        assert code == 2  # no runs there yet, said plainly
        err = capsys.readouterr().err
        assert "hisf-bench report:" in err and "unrecognized arguments" not in err
