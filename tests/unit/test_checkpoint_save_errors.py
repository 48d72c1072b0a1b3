"""A save that cannot be written (a full disk): one CheckpointError that says so, and the
previous checkpoint still the one a resume loads. The disk fills by injection: DCP's file
streams raise OSError(ENOSPC) once a few hundred bytes are written."""

import contextlib
import errno
import io
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from megatron_paci.checkpoint import format as fmt
from megatron_paci.checkpoint.format import (
    CheckpointError,
    resolve_loadable,
    save_checkpoint,
    wait_for_pending_save,
)


class _Filling(io.RawIOBase):
    """A file on a disk that has ``room`` bytes left."""

    def __init__(self, f, room, code):
        self.f, self.room, self.code = f, room, code

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(b)
        return self.f.write(b)

    def tell(self):
        return self.f.tell()

    def seekable(self):
        return True

    def seek(self, *a):
        return self.f.seek(*a)

    def fileno(self):
        return self.f.fileno()


@contextlib.contextmanager
def disk_fills(monkeypatch, room=300, code=errno.ENOSPC):
    real = dcp_fs.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as f:
            yield _Filling(f, room, code) if "w" in mode and str(path).endswith(".distcp") else f

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)
    yield
    monkeypatch.undo()


def tensors():
    return {"model": {"w": torch.arange(4096, dtype=torch.float32)}}


def test_disk_full_during_the_tensor_write(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save_checkpoint(root, 2, tensors(), {"consumed_samples": 1}, "a: 1\n")
    with disk_fills(monkeypatch), pytest.raises(CheckpointError) as e:
        save_checkpoint(root, 4, tensors(), {"consumed_samples": 2}, "a: 1\n")
    msg = str(e.value)
    assert "\n" not in msg and "unexpected pos" not in msg
    assert "the disk is full (No space left on device" in msg
    assert f"free on {root}" in msg and f"{good} is still the newest complete" in msg
    assert sorted(os.listdir(root)) == ["iter_0000002", fmt.LATEST_FILE]  # no .partial
    assert resolve_loadable(root) == good


def test_another_write_error_is_named_as_itself(tmp_path, monkeypatch):
    with disk_fills(monkeypatch, code=errno.EIO), pytest.raises(CheckpointError) as e:
        save_checkpoint(str(tmp_path), 1, tensors(), {}, "a: 1\n")
    msg = str(e.value)
    assert "OSError: [Errno 5] Input/output error" in msg and "disk is full" not in msg
    assert "no earlier checkpoint exists" in msg and os.listdir(tmp_path) == []


def test_disk_full_writing_the_sidecars(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save_checkpoint(root, 2, tensors(), {}, "a: 1\n")
    real = fmt._write_text

    def write_text(path, text):
        if path.endswith(fmt.META_FILE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
        real(path, text)

    monkeypatch.setattr(fmt, "_write_text", write_text)
    with pytest.raises(CheckpointError, match="the disk is full .*meta.json.tmp"):
        save_checkpoint(root, 4, tensors(), {}, "a: 1\n")
    assert sorted(os.listdir(root)) == ["iter_0000002", fmt.LATEST_FILE]
    assert resolve_loadable(root) == good


def test_disk_full_in_an_asynchronous_save(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save_checkpoint(root, 2, tensors(), {}, "a: 1\n")
    with disk_fills(monkeypatch):
        save_checkpoint(root, 4, tensors(), {}, "a: 1\n", async_save=True)
        with pytest.raises(CheckpointError) as e:
            wait_for_pending_save()
    msg = str(e.value)
    assert msg.startswith("asynchronous save of checkpoint") and "the disk is full" in msg
    assert sorted(os.listdir(root)) == ["iter_0000002", fmt.LATEST_FILE]
    assert resolve_loadable(root) == good
