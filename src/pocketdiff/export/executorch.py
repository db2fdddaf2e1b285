"""ExecuTorch export: ``torch.export`` -> edge dialect lowered to XNNPACK -> ``.pte``, parity-checked by
running each program in ExecuTorch's own runtime (the pybindings that ship with the pip package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import PocketdiffError
from .graphs import Parity, graph_specs, guarded, with_progress

# XNNPACK fp32 kernels agree with torch's to float rounding
MAX_ABS, MIN_PSNR = 1e-3, 60.0


def _require():
    if importlib.util.find_spec("executorch") is None:
        raise PocketdiffError("ExecuTorch export needs executorch: pip install executorch "
                              "(from a pocketdiff clone: pip install -e '.[executorch]')")


def load_method(path: str | Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def export_executorch(parts: dict, out: Path, check: bool = True) -> dict:
    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    components = {}
    for spec in with_progress(graph_specs(parts, batch=None), "ExecuTorch"):
        path = out / f"{spec.name}.pte"
        with guarded("ExecuTorch", spec.name):
            program = torch.export.export(spec.module, tuple(spec.inputs.values()))
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
            path.write_bytes(lowered.buffer)
            entry = {"file": path.name, **spec.signature(dynamic_batch=False), "config": spec.config,
                     "backend": "xnnpack"}
            if check:
                ref = spec.reference()
                got = load_method(path).execute(list(spec.inputs.values()))[0]
                parity = Parity.of(got, ref)
                parity.check(spec.name, "ExecuTorch", MAX_ABS * max(1.0, float(ref.abs().max())), MIN_PSNR)
                entry["parity"] = parity.as_dict()
        components[spec.name] = entry
    return {"components": components, "runtime": "executorch (XNNPACK delegate)"}
