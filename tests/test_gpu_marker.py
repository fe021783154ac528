"""The `gpu` marker rule (tests/conftest.py): without CUDA, gpu tests are deselected, never skipped or passed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SAMPLE = '''
import pytest

def test_plain():
    assert 1 + 1 == 2

@pytest.mark.gpu
def test_one_gpu():
    raise AssertionError("a gpu test ran without CUDA")

@pytest.mark.gpu(devices=2)
def test_two_gpus():
    raise AssertionError("a gpu test ran without CUDA")

@pytest.mark.gpu
@pytest.mark.parametrize("x", [1, 2])
def test_parametrized(x):
    raise AssertionError("a gpu test ran without CUDA")

class TestModuleMark:
    pytestmark = pytest.mark.gpu

    def test_in_class(self):
        raise AssertionError("a gpu test ran without CUDA")
'''


def _pytest(*args, cwd: Path) -> subprocess.CompletedProcess:
    # CUDA hidden, so the rule sees no GPU on any machine (this test also holds on a GPU machine).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _sample(tmp_path: Path) -> Path:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -ra --strict-markers\nmarkers =\n    gpu(devices=1): needs CUDA\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    return tmp_path


def test_gpu_tests_are_deselected_not_skipped_without_cuda(tmp_path):
    root = _sample(tmp_path)
    proc = _pytest("-q", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b1 passed, 5 deselected\b", proc.stdout), proc.stdout
    assert "skipped" not in proc.stdout and "xfail" not in proc.stdout

    # `-m gpu` on a CPU machine: nothing runs (pytest's exit 5), nothing counts as passed or skipped.
    proc = _pytest("-q", "-m", "gpu", cwd=root)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert re.search(r"\b6 deselected\b", proc.stdout) and "passed" not in proc.stdout and "skipped" not in proc.stdout


def test_a_bad_devices_count_is_a_usage_error(tmp_path):
    root = _sample(tmp_path)
    (root / "test_sample.py").write_text("import pytest\n\n@pytest.mark.gpu(devices=0)\ndef test_x():\n    pass\n")
    proc = _pytest("-q", cwd=root)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "test_x: @pytest.mark.gpu(devices=...) expects an int >= 1, got 0" in proc.stdout + proc.stderr


def test_the_cuda_tests_collect_without_cuda_and_are_all_deselected():
    """tests/gpu imports cleanly on a CPU machine (no Ray/MLflow/Optuna needed) and every test in it is deselected."""
    proc = _pytest("--collect-only", "-q", "tests/gpu", cwd=ROOT)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    m = re.search(r"no tests collected \((\d+) deselected\)", proc.stdout)
    assert m and int(m.group(1)) >= 15, proc.stdout
    assert "error" not in proc.stdout.lower()
    probe = "import sys; sys.argv = ['pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/gpu']; " \
            "import pytest; pytest.main(sys.argv[1:]); print(sorted(m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
