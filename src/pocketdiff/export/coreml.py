"""Core ML export (coremltools, ML program, fp32 compute) of the three graphs as ``.mlpackage`` files.

Core ML runs predictions only on macOS: elsewhere the conversion runs and is validated (the package
loads its spec back and its inputs/outputs match the signature), and the manifest says the numeric
parity check was not run. On macOS each package is run against torch like the other formats.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import numpy as np
import torch

from ..errors import PocketdiffError
from .graphs import Parity, first_line, graph_specs, guarded, with_progress

MAX_ABS, MIN_PSNR = 1e-3, 60.0


def _require():
    if importlib.util.find_spec("coremltools") is None:
        raise PocketdiffError("Core ML export needs coremltools: pip install coremltools "
                              "(from a pocketdiff clone: pip install -e '.[coreml]')")


def _convert(ct, spec, inputs, target):
    """torch.export first (the UNet's timestep arithmetic only converts from it), TorchScript second
    (transformers' CLIP leaves an ``alias`` node in exported programs that the converter lacks)."""
    args = tuple(spec.inputs.values())
    kw = dict(inputs=inputs, outputs=[ct.TensorType(name=spec.outputs[0])], convert_to="mlprogram",
              compute_precision=ct.precision.FLOAT32, minimum_deployment_target=target)
    errors = []
    for name, program in (("torch.export", lambda: torch.export.export(spec.module, args).run_decompositions({})),
                          ("TorchScript", lambda: torch.jit.trace(spec.module, args, strict=False))):
        try:
            return ct.convert(program(), **kw)
        except Exception as e:  # try the other front end; report both if neither converts
            errors.append(f"{name}: {first_line(e)[:120]}")
    raise PocketdiffError(f"Core ML cannot convert {spec.name} ({'; '.join(errors)})")


def export_coreml(parts: dict, out: Path, check: bool = True, deployment_target: str = "iOS17") -> dict:
    _require()
    import coremltools as ct

    components = {}
    for spec in with_progress(graph_specs(parts, batch=None), "Core ML"):
        path = out / f"{spec.name}.mlpackage"
        inputs = [ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.int32 if x.dtype == torch.int64 else np.float32)
                  for n, x in spec.inputs.items()]
        with guarded("Core ML", spec.name):
            model = _convert(ct, spec, inputs, getattr(ct.target, deployment_target))
            model.save(str(path))
        sig = spec.signature(dynamic_batch=False)
        for i in sig["inputs"]:
            if i["dtype"] == "int64":
                i["dtype"] = "int32"  # Core ML has no int64 inputs
        with guarded("Core ML", spec.name):
            saved = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description
        if [i.name for i in saved.input] != [i["name"] for i in sig["inputs"]] or \
                [o.name for o in saved.output] != spec.outputs:
            raise PocketdiffError(f"Core ML package of {spec.name} does not have the documented signature")
        entry = {"file": path.name, **sig, "config": spec.config, "precision": "float32"}
        if check and platform.system() == "Darwin":
            ref = spec.reference()
            feed = {n: x.numpy().astype(np.int32 if x.dtype == torch.int64 else np.float32)
                    for n, x in spec.inputs.items()}
            with guarded("Core ML", spec.name):
                got = torch.from_numpy(model.predict(feed)[spec.outputs[0]])
            parity = Parity.of(got, ref)
            parity.check(spec.name, "Core ML", MAX_ABS * max(1.0, float(ref.abs().max())), MIN_PSNR)
            entry["parity"] = parity.as_dict()
        else:
            entry["parity"] = {"skipped": "Core ML runs predictions only on macOS; conversion validated"}
        components[spec.name] = entry
    return {"components": components, "deployment_target": deployment_target}
