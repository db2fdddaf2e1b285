"""Atomic writes: a file or a folder appears whole under its name or not at all, and a user's file is never lost.

Everything pocketdiff writes (images, caches, checkpoints' parts, model folders, exports, datasets) goes through
these: the content is written beside its destination under a hidden temporary name (so the final rename stays
on one filesystem) and renamed into place. Permissions follow the umask, as ordinary file creation does
(``tempfile`` alone would leave folders 0700 and files 0600). A hidden temporary of ours that a killed run left
behind is removed by the next write to the same destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ModelFolderError

STALE_AFTER_S = 600.0  # a temporary of ours this old belongs to a dead writer


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_mode(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _clean_stale(parent: Path, prefix: str) -> None:
    """Remove our own hidden temporaries (``prefix*``) in ``parent`` left by a writer that died."""
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        try:
            if now - p.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one rename."""
    path = Path(path)
    prefix = f".{path.name}.tmp"
    _clean_stale(path.parent, prefix)
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _open_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """A safetensors file written atomically (contiguous CPU copies of the tensors)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """A text file written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_folder(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` in one rename (the old one is put
    back if anything fails)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ModelFolderError(f"{dest}: exists and is a file, not a folder; choose another path")
    if dest.exists() and not overwrite and any(dest.iterdir()):
        raise ModelFolderError(f"{dest}: already exists; choose another path or pass --overwrite")
    if not dest.parent.exists():
        raise ModelFolderError(f"{dest.parent}: folder does not exist; create it first")
    _clean_stale(dest.parent, f".{dest.name}.tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    _open_mode(tmp, is_dir=True)
    old = dest.with_name(f".{dest.name}.old")
    moved = False
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            moved = True
        tmp.rename(dest)
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not dest.exists():
            old.rename(dest)  # put the user's folder back
        raise
