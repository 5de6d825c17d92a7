"""The one atomic-write helper (lesion_kd.io_utils): a reader sees the old file or the whole new one, never a
part, and a failed or interrupted write leaves neither a partial target nor its temporary file."""

from __future__ import annotations

import os

import pytest

from lesion_kd import io_utils
from lesion_kd.data import io as data_io
from lesion_kd.io_utils import atomic_copy, atomic_path, atomic_write_bytes, atomic_write_text


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_the_whole_file_creating_its_folder(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write_bytes(target, b"one")
    atomic_write_text(target, "two \u00e9\n")
    assert target.read_bytes() == "two \u00e9\n".encode()
    assert leftovers(target.parent) == ["x.json"]


def test_an_interrupted_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the n")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a long write
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == ["x.bin"]


def test_a_failed_rename_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "entry.bin"

    def crash(*args):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"x" * 1000)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []


def test_a_failed_copy_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing", tmp_path / "out" / "copy")
    assert leftovers(tmp_path / "out") == []
    (tmp_path / "src").write_bytes(b"payload")
    atomic_copy(tmp_path / "src", tmp_path / "out" / "copy")
    assert (tmp_path / "out" / "copy").read_bytes() == b"payload"
    assert leftovers(tmp_path / "out") == ["copy"]


def test_the_data_layer_uses_the_same_helper():
    assert data_io.atomic_write_bytes is io_utils.atomic_write_bytes


def test_the_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "x", b"data")
    assert events == ["fsync", "replace"]
