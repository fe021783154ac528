"""Atomic writes on a full disk: the error names the file and ENOSPC (torch's own wraps it), and no temp file stays."""

import errno
import io
import os

import pytest
import torch

from hisf.engine import atomic

REAL_FDOPEN = os.fdopen


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails every write as a full disk does."""

    def __init__(self, fd: int, room: int):
        self.f = REAL_FDOPEN(fd, "wb")
        self.room = room

    def writable(self):
        return True

    def write(self, b):
        b = b.encode() if isinstance(b, str) else b
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("write", ["torch", "text"])
def test_a_full_disk_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch, write):
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FullDisk(fd, room=100))
    target = tmp_path / "ckpt" / ("state.pt" if write == "torch" else "metrics.json")
    with pytest.raises(OSError) as info:
        if write == "torch":
            atomic.atomic_save({"x": torch.zeros(10_000)}, target)  # torch raises a RuntimeError of its own
        else:
            atomic.atomic_write_text("x" * 10_000, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert str(info.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{target}'"
    assert os.listdir(target.parent) == []
    assert atomic.no_space_error(RuntimeError("wrapped")) is None


def test_other_write_errors_pass_unchanged(tmp_path, monkeypatch):
    def refuse(fd, mode):
        os.close(fd)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "fdopen", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        atomic.atomic_write_text("x", tmp_path / "a.txt")
