"""``--backend auto`` (the default): onnxruntime through an ONNX export made once per model, else torch.

onnxruntime ran the shipped UNets 2.7-3.2x faster than torch eager on this CPU, so ``auto`` takes it whenever the
call allows: the model folder is exported once (``pocketdiff export``'s exporter, with its parity gate) into a user
cache folder, keyed by a digest of every file of the model folder and by pocketdiff's version, and later runs
load that export (0.3 s against 2.9 s for the default model's torch load). An entry records the SHA-256 of each
file it wrote and is checked on every use: a corrupt, partial or stale entry is rebuilt, never used.

``auto`` runs torch when the call needs what only the torch path has (:func:`torch_reason`): a device other than
the CPU, a swapped VAE, model-level tiling, a runner choice, pickle weights, a quantized folder (pocketdiff's
int8 runs in torch), or an image size other than the model's own (the exports have fixed spatial shapes); and
when onnxruntime is not installed or the export fails (the note says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ENTRY = "entry.json"
OPSET = 18


def cache_root() -> Path:
    """``$POCKETDIFF_CACHE``, else ``$XDG_CACHE_HOME/pocketdiff``, else ``~/.cache/pocketdiff``."""
    if os.environ.get("POCKETDIFF_CACHE"):
        return Path(os.environ["POCKETDIFF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pocketdiff"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """What identifies a model folder's export: every file's relative path and content, pocketdiff's version."""
    from ..version import __version__

    h = hashlib.sha256(f"pocketdiff {__version__} onnx opset {OPSET}".encode())
    for p in _files(folder):
        h.update(f"{p.relative_to(folder).as_posix()}:{_sha256(p)}".encode())
    return h.hexdigest()


def torch_reason(folder: Path, *, device: str = "cpu", vae=None, runner: str = "auto", trust_pickle: bool = False,
                 tiling: bool = False, size: tuple[int | None, int | None] = (None, None),
                 native: int | None = None) -> str | None:
    """Why this call must run torch (None: onnxruntime can run it)."""
    import importlib.util

    if device != "cpu":
        return f"--device {device}"
    if vae:
        return "--vae"
    if tiling:
        return "model-level tiling"
    if runner != "auto":
        return f"--runner {runner}"
    if trust_pickle:
        return "--trust-pickle"
    if (folder / "unet" / "quantization.json").is_file():
        return "a pocketdiff int8 folder"
    if native is not None and any(s not in (None, native) for s in size):
        return f"a size other than the model's {native} px"
    for module in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def entry_ok(entry: Path) -> bool:
    """The entry's record exists and every file it lists has the recorded SHA-256."""
    try:
        record = json.loads((entry / ENTRY).read_text())
        return all(_sha256(entry / name) == digest for name, digest in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_export(folder: Path, name: str) -> Path:
    """The ONNX export of ``folder`` in the cache, made now (once) when missing, corrupt or stale."""
    import fcntl

    digest = folder_digest(folder)
    root = cache_root() / "onnx"
    entry = root / digest[:32]
    if entry_ok(entry):
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{digest[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per entry; the others wait and use its result
        if not entry_ok(entry):
            _build(folder, name, entry, digest)
    return entry


def _build(folder: Path, name: str, entry: Path, digest: str) -> None:
    from ..export import export_model
    from ..folder import load_components

    parts = load_components(folder)  # a folder that does not load fails here, as it would on torch
    print(f"pocketdiff: {name}: first run on onnxruntime: exporting it once (a minute or less for the shipped "
          f"models; cached in {entry})", file=sys.stderr, flush=True)
    export_model(folder, entry, "onnx", overwrite=True, parts=parts, opset=OPSET)
    files = {p.relative_to(entry).as_posix(): _sha256(p) for p in _files(entry)}
    record = {"source": str(folder.resolve()), "digest": digest, "files": files}
    tmp = entry / f".{ENTRY}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, entry / ENTRY)  # the record last: an entry without one is incomplete
    _drop_stale(entry, record["source"])


def _drop_stale(keep: Path, source: str) -> None:
    """Older entries made from the same source folder (its weights changed since)."""
    for other in keep.parent.iterdir():
        if other == keep or not other.is_dir():
            continue
        try:
            if json.loads((other / ENTRY).read_text()).get("source") == source:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError):
            continue
