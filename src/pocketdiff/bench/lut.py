"""A latency lookup table as data: what removing each UNet block saves, measured on one runtime (SnapFusion).

SnapFusion's architecture evolution scores a block by the quality it costs over the latency it saves, with the
latency read from a table measured per block on the target device. This is that table for one UNet at one
resolution, batch and thread count, on torch (eager, CPU) or onnxruntime:

* ``total_ms``: the whole UNet step, measured (median);
* per ResNet / transformer block: its own time on the inputs it gets in a real step (``ms``) and what it costs
  once removed (``removed_ms``: nothing for a transformer or a same-width ResNet, the 1x1 shortcut for a ResNet
  that changes width), so ``saving_ms = ms - removed_ms``;
* :meth:`LatencyTable.predict` of a set of removed blocks is ``total_ms`` less their savings. Blocks are timed
  alone, so the prediction ignores what fusing and caches do across blocks: ``benchmarks/search_sd.py`` measures
  how far a prediction is from the measured step.

Saved as JSON (atomically); the ``arch`` digest of the UNet's config ties a table to the UNet it was measured on.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .blocks import _stage, captured_inputs, median_ms
from .measure import component_call

RUNTIMES = ("torch", "onnxruntime")
SKIPPABLE = ("ResnetBlock2D", "Transformer2DModel")


def arch_digest(unet: torch.nn.Module) -> str:
    """A digest of the UNet's architecture (its config, removed blocks included)."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class LatencyTable:
    runtime: str
    resolution: int
    batch: int
    cfg: bool
    threads: int
    arch: str
    total_ms: float
    blocks: dict[str, dict] = field(default_factory=dict)  # name -> {type, stage, ms, removed_ms, saving_ms}

    def saving(self, names) -> float:
        """ms saved by removing the blocks ``names`` (each measured alone)."""
        unknown = [n for n in names if n not in self.blocks]
        if unknown:
            raise KeyError(f"the latency table has no block {unknown[0]!r}; measure it on this UNet")
        return sum(self.blocks[n]["saving_ms"] for n in names)

    def predict(self, removed) -> float:
        """Predicted ms of the UNet step with the blocks ``removed``."""
        return self.total_ms - self.saving(removed)

    def save(self, path: str | Path) -> Path:
        from ..files import write_text

        return write_text(Path(path), json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        from ..errors import PocketdiffError

        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise PocketdiffError(f"{path}: not a latency table ({str(e).splitlines()[0][:80]}); write one with "
                                  "`pocketdiff bench --lut FILE`") from None


class _Bound(torch.nn.Module):
    """``module(*args, **kwargs)`` of a captured call, its tensor arguments as the inputs (for export)."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.module, self.args, self.kwargs = module, args, kwargs
        self.slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def tensors(self) -> tuple:
        return tuple(self.args[i] for i in self.slots) + tuple(self.kwargs[k] for k in self.keys)

    def forward(self, *tensors):
        args, kwargs = list(self.args), dict(self.kwargs)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        kwargs.update(zip(self.keys, tensors[len(self.slots):]))
        out = self.module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def _ort_ms(module: torch.nn.Module, tensors: tuple, runs: int, warmup: int, threads: int) -> float:
    """Median ms of ``module(*tensors)`` exported to ONNX and run by onnxruntime."""
    from ..export.onnx import session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.onnx"
        names = [f"in{i}" for i in range(len(tensors))]
        program = torch.onnx.export(module, tensors, dynamo=True, opset_version=18, input_names=names,
                                    verbose=False)
        program.save(str(path))
        sess = session(path, threads)
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        return median_ms(lambda: sess.run(None, feed), runs, warmup)[0]


def _shortcut(module: torch.nn.Module):
    return module.conv_shortcut if type(module).__name__ == "ResnetBlock2D" else None


@torch.no_grad()
def measure_lut(unet: torch.nn.Module, *, runtime: str = "torch", resolution: int, batch: int = 1,
                cfg: bool = True, runs: int = 5, warmup: int = 1, latent_factor: int = 8,
                seq_len: int | None = None) -> LatencyTable:
    """Measure the table of ``unet``'s ResNet and transformer blocks (blocks already removed are left out)."""
    from ..blocks.surgery import is_removed

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    threads = torch.get_num_threads()
    captured = captured_inputs(unet, resolution=resolution, batch=batch, cfg=cfg, latent_factor=latent_factor,
                               seq_len=seq_len)

    def timed(module, args, kwargs) -> float:
        bound = _Bound(module, args, kwargs)
        if runtime == "torch":
            return median_ms(lambda: bound(*bound.tensors()), runs, warmup)[0]
        return _ort_ms(bound, bound.tensors(), runs, warmup, threads)

    blocks = {}
    for name, (module, args, kwargs, _) in captured.items():
        if type(module).__name__ not in SKIPPABLE or is_removed(module):
            continue
        ms = timed(module, args, kwargs)
        short = _shortcut(module)
        removed = timed(short, args[:1], {}) if short is not None else 0.0
        blocks[name] = {"type": type(module).__name__, "stage": _stage(name), "ms": ms, "removed_ms": removed,
                        "saving_ms": max(ms - removed, 0.0)}
    fn, inputs = component_call("unet", unet, resolution=resolution, batch=batch, cfg=cfg, latent_factor=latent_factor,
                                seq_len=seq_len)
    total = timed(_Call(fn), inputs, {})
    return LatencyTable(runtime, resolution, batch, cfg, threads, arch_digest(unet), total, blocks)


class _Call(torch.nn.Module):
    """A plain callable as a module (so the whole step exports like a block)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
