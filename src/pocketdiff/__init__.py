"""pocketdiff: small, few-step text-to-image latent diffusion models for laptop CPUs and phones."""

import os as _os

# Never reach a model hub, even by accident: every model loads from a local folder. ORT_DISABLE_TELEMETRY is
# read when onnxruntime is imported (setting it later, or disable_telemetry_events(), leaves the DNS lookups for
# its telemetry host that torch.onnx's export optimizer triggered: tests/test_offline.py traces them).
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
           "DISABLE_TELEMETRY", "ORT_DISABLE_TELEMETRY"):
    _os.environ.setdefault(_k, "1")

from .version import __version__  # noqa: E402  (after the offline environment above)


def load_pipeline(path="default", *, backend="auto", **kwargs):
    """Load a local diffusers-format model folder (or a shipped model by name, or an ONNX export folder); see
    :mod:`pocketdiff.pipeline` for the call. ``backend``: "auto" (onnxruntime through an ONNX export made once per
    model and cached, unless an option needs torch), "torch" (torch modules: what fine-tuning and ``pipe.to(...)``
    need) or "onnxruntime"; other keywords: those of :func:`pocketdiff.loader.load_generator` (``vae``,
    ``device``, ``runner``, ``trust_pickle``, ``threads``, tiling)."""
    from .loader import load_generator
    from .models.registry import resolve_model

    return load_generator(resolve_model(path), str(path), backend=backend, **kwargs)


__all__ = ["load_pipeline", "__version__"]
