"""Atomic writes: whole or absent, the user's file kept on failure, umask permissions, stale temporaries cleaned."""

import os
import time

import pytest
import torch

from pocketdiff.files import STALE_AFTER_S, atomic_file, atomic_folder, save_tensors, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        f = save_tensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors")
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "inner.txt").write_text("x")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644  # tempfile alone would give 0600
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # and 0700


def test_a_stale_temporary_of_ours_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".out.tmpabc123"
    stale.mkdir()
    (stale / "part").write_text("left by a killed export")
    t = time.time() - STALE_AFTER_S - 5
    os.utime(stale, (t, t))
    fresh = tmp_path / ".out.tmpfresh"  # a live writer's: too recent to touch
    fresh.mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and fresh.exists() and (tmp_path / "out" / "x").is_file()
