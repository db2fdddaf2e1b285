"""Load the pipeline a command runs: a torch model folder or an ONNX export, with the options checked first."""

from __future__ import annotations

from pathlib import Path

from .errors import PocketdiffError


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


def load_generator(folder: Path, model: str, *, backend: str = "torch", device: str = "cpu", vae: str | None = None,
                   runner: str = "auto", trust_pickle: bool = False, threads: int | None = None,
                   attention_chunk: int | None = None, vae_tile: int | None = None, stream_unet: bool = False):
    """The pipeline of a model folder (``model``: the name the user gave, for messages): the ONNX export with
    ``backend="onnxruntime"``, else the torch folder (with ``vae``, tiling and ``device``); every option that does
    not fit the backend is refused before the load."""
    from .export import read_manifest
    from .pipeline import Pipeline

    manifest = read_manifest(folder)
    if backend == "onnxruntime":
        if manifest is None or manifest.get("format") != "onnx":
            raise PocketdiffError(f"{folder}: not an ONNX export; create one with: pocketdiff export {model} "
                                  "--format onnx -o DIR, then pass --model DIR")
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
