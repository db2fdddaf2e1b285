"""Load the pipeline a command runs: a torch model folder or an ONNX export, with the options checked first."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelFolderError, PocketdiffError


def _torch_device(name: str):
    """``--device`` as a torch.device, checked against what this torch can reach."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise PocketdiffError(f"--device {name}: not a device pocketdiff runs on; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PocketdiffError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; drop --device, or "
                              "install a CUDA build of torch on a machine with one")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PocketdiffError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PocketdiffError(f"--device {name}: MPS (Apple GPU) is not available here; drop --device")
    return device


def native_size(folder: Path) -> int | None:
    """The image size a model folder generates by default (its UNet's sample size times the VAE factor)."""
    import json

    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def choose_backend(folder: Path, model: str, *, size=(None, None), **options) -> tuple[str, Path, str]:
    """``--backend auto``: (backend, folder to load, why) for a call with these options (see backends.auto)."""
    from .backends.auto import cached_export, torch_reason
    from .export import read_manifest

    manifest = read_manifest(folder)
    if manifest is not None:
        backend = "onnxruntime" if manifest.get("format") == "onnx" else "torch"  # torch refuses other formats
        return backend, folder, "an export folder"
    reason = torch_reason(folder, size=size, native=native_size(folder), **options)
    if reason:
        return "torch", folder, f"auto: {reason} needs torch"
    try:
        return "onnxruntime", cached_export(folder, model), "auto: cached ONNX export"
    except ModelFolderError:  # a folder that does not load: the same one-line error as on torch
        raise
    except (PocketdiffError, RuntimeError, ValueError, OSError) as e:  # an unexportable model still generates
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return "torch", folder, f"auto: the ONNX export failed ({first[:200]})"


def load_generator(folder: Path, model: str, *, backend: str = "auto", device: str = "cpu", vae: str | None = None,
                   runner: str = "auto", trust_pickle: bool = False, threads: int | None = None,
                   attention_chunk: int | None = None, vae_tile: int | None = None, stream_unet: bool = False,
                   size: tuple[int | None, int | None] = (None, None)):
    """The pipeline of a model folder (``model``: the name the user gave, for messages). ``backend``: "auto"
    (:func:`choose_backend`: onnxruntime through a cached export unless the options need torch), "onnxruntime"
    (an ONNX export folder) or "torch" (the folder, with ``vae``, tiling and ``device``). Every option that does not
    fit the backend is refused before the load. The pipeline's ``backend`` and ``backend_why`` say what runs."""
    why = "asked for"
    if backend == "auto":
        tiling = attention_chunk is not None or vae_tile is not None or stream_unet
        backend, folder, why = choose_backend(folder, model, size=size, device=device, vae=vae, runner=runner,
                                              trust_pickle=trust_pickle, tiling=tiling)
    pipe = _load(folder, model, backend, device=device, vae=vae, runner=runner, trust_pickle=trust_pickle,
                 threads=threads, attention_chunk=attention_chunk, vae_tile=vae_tile, stream_unet=stream_unet)
    pipe.backend, pipe.backend_why = backend, why
    return pipe


def _load(folder: Path, model: str, backend: str, *, device, vae, runner, trust_pickle, threads, attention_chunk,
          vae_tile, stream_unet):
    from .export import read_manifest
    from .pipeline import Pipeline

    manifest = read_manifest(folder)
    if backend == "onnxruntime":
        if manifest is None or manifest.get("format") != "onnx":
            raise PocketdiffError(f"{folder}: not an ONNX export; create one with: pocketdiff export {model} "
                                  "--format onnx -o DIR, then pass --model DIR (or use --backend auto)")
        if attention_chunk is not None or vae_tile is not None or stream_unet or vae or device != "cpu":
            raise PocketdiffError("--vae, --device and the model-level tiling flags apply to the torch backend only")
        from .backends.onnxruntime import load_onnx_pipeline

        return load_onnx_pipeline(folder, manifest, threads=threads)
    if manifest is not None:
        hint = "run it with --backend onnxruntime" if manifest.get("format") == "onnx" else \
            "run it with its own runtime on the device"
        raise PocketdiffError(f"{folder}: is a {manifest.get('format')} export, not a model folder; {hint}")
    torch_device = _torch_device(device)  # checked before the model loads
    if torch_device.type != "cpu" and stream_unet:
        raise PocketdiffError("--stream-unet reads UNet blocks from disk into CPU memory; drop it or --device")
    pipe = Pipeline.from_folder(folder, trust_pickle=trust_pickle, runner=runner, vae=vae)
    pipe.enable_tiling(attention_chunk=attention_chunk, vae_tile=vae_tile, stream_unet=stream_unet)
    return pipe.to(torch_device) if torch_device.type != "cpu" else pipe
