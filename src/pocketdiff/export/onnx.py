"""ONNX export (torch.onnx's dynamo exporter) with an onnxruntime parity check per graph."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PocketdiffError
from .graphs import Parity, graph_specs, guarded, with_progress

SUPPORTED_OPSETS = range(18, 24)
# fp32 exported graphs agree with torch to float rounding; the limits leave room for reordered sums
MAX_ABS, MIN_PSNR = 1e-3, 60.0


def _require():
    import importlib.util

    for module in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise PocketdiffError(f"ONNX export needs {module}: pip install onnx onnxruntime onnxscript "
                                  "(from a pocketdiff clone: pip install -e '.[onnx]')")


def onnxruntime_offline():
    """onnxruntime with its telemetry events off (``ORT_DISABLE_TELEMETRY``, which onnxruntime reads at import, is
    set by ``import pocketdiff``; this covers an onnxruntime imported before pocketdiff as far as its API allows)."""
    import onnxruntime as ort

    ort.disable_telemetry_events()
    return ort


def session(path: str | Path, threads: int | None = None):
    ort = onnxruntime_offline()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # no busy-waiting between runs: spinning threads keep the cores after a call returns, which starves the
    # torch code that runs between calls (measured: a torch UNet step 4x slower interleaved with a session)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(sess, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    feed = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    return torch.from_numpy(sess.run(None, feed)[0])


def export_onnx(parts: dict, out: Path, opset: int = 18, check: bool = True) -> dict:
    _require()
    onnxruntime_offline()
    if opset not in SUPPORTED_OPSETS:
        raise PocketdiffError(f"ONNX opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}-"
                              f"{SUPPORTED_OPSETS.stop - 1} (the dynamo exporter needs 18 or newer)")
    components = {}
    for spec in with_progress(graph_specs(parts), "ONNX"):
        path = out / f"{spec.name}.onnx"
        batch = torch.export.Dim("batch", min=1, max=1024)
        with guarded("ONNX", spec.name):
            program = torch.onnx.export(spec.module, tuple(spec.inputs.values()), dynamo=True, opset_version=opset,
                                        input_names=list(spec.inputs), output_names=spec.outputs, verbose=False,
                                        dynamic_shapes={k: {0: batch} for k in spec.inputs})
            n_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
            program.save(str(path), external_data=n_bytes > 1.5 * 2**30)  # protobuf's 2 GB limit
            entry = {"file": path.name, **spec.signature(), "config": spec.config}
            if check:
                ref = spec.reference()
                parity = Parity.of(run_session(session(path), spec.inputs), ref)
                parity.check(spec.name, "ONNX", MAX_ABS * max(1.0, float(ref.abs().max())), MIN_PSNR)
                entry["parity"] = parity.as_dict()
        components[spec.name] = entry
    return {"opset": opset, "components": components}


def quantize_dynamic_matmul(src: str | Path, dest: str | Path) -> Path:
    """onnxruntime's dynamic int8 quantization of MatMul nodes only (weights int8 per tensor, activations
    quantized per call). Convolutions stay fp32: int8 convolutions made a BK-SDM-Tiny UNet step 1.8x
    slower than torch on this CPU (measured when the export issue was filed)."""
    onnxruntime_offline()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dest), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    return Path(dest)
