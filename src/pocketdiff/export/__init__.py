"""Export a model folder to deployable artefacts: ``pocketdiff export --format onnx|executorch|coreml``.

One module per format, registered by name in :data:`EXPORTERS`. Each writes the text encoder, UNet
and VAE decoder as separate artefacts with the signatures of :mod:`pocketdiff.export.graphs`, a
``manifest.json`` describing them, and the tokenizer and scheduler config the samplers need; each
checks every artefact against torch on sample inputs and fails, writing nothing, when parity fails
(Core ML can run its packages only on macOS: elsewhere the manifest marks the check skipped).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Callable

from ..errors import PocketdiffError

# format name -> "module:function"; modules are imported on use (their runtimes are optional installs)
EXPORTERS: dict[str, str] = {
    "onnx": "pocketdiff.export.onnx:export_onnx",
    "executorch": "pocketdiff.export.executorch:export_executorch",
    "coreml": "pocketdiff.export.coreml:export_coreml",
}

MANIFEST = "manifest.json"


def exporter(fmt: str) -> Callable:
    if fmt not in EXPORTERS:
        raise PocketdiffError(f"unknown export format {fmt!r}; choose one of {', '.join(sorted(EXPORTERS))}")
    module, fn = EXPORTERS[fmt].split(":")
    return getattr(importlib.import_module(module), fn)


def export_model(src: str | Path, out: str | Path, fmt: str, *, overwrite: bool = False, parts: dict | None = None,
                 **options) -> dict:
    """Export the model folder ``src`` into the new folder ``out``; returns the manifest. ``parts``: its components
    when the caller has loaded them already."""
    from ..folder import atomic_folder, load_components

    export = exporter(fmt)
    src = Path(src)
    parts = parts if parts is not None else load_components(src)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        manifest = export(parts, tmp, **options)
        manifest = {"format": fmt, "source": src.name, **manifest}
        shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        shutil.copytree(src / "scheduler", tmp / "scheduler")
        if (src / "pocketdiff.json").is_file():
            shutil.copy(src / "pocketdiff.json", tmp / "pocketdiff.json")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of an exported folder, or None for a folder that is not an export."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PocketdiffError(f"{path}: not valid JSON ({e.msg}); re-export the model") from None
