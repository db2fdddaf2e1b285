"""torch vs onnxruntime (fp32, and dynamic int8 on MatMul) per UNet step, same run, interleaved.

Two models: the shipped default model (its own size), and an SD-scale compact UNet (BK-SDM-Tiny,
random weights, 512 px). Each UNet is exported with pocketdiff's ONNX exporter (parity-checked),
quantized with onnxruntime's dynamic int8 on MatMul nodes (int8 on convolutions too is measured
here as much slower on this CPU), then the three runtimes are called in turn on the same inputs.

    python benchmarks/onnx_runtime.py [--model [LABEL=]NAME ...] [--runs 10] [--sd-runs 3] [--json docs/results/onnx_runtime.json]

A model given as LABEL=NAME is named LABEL in the table (else by its folder's name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.bench.measure import component_call  # noqa: E402
from pocketdiff.export.graphs import Parity, UNetGraph  # noqa: E402
from pocketdiff.export.onnx import quantize_dynamic_matmul, run_session, session  # noqa: E402


def export_unet(unet, inputs: dict, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        prog = torch.onnx.export(UNetGraph(unet).eval(), tuple(inputs.values()), dynamo=True, opset_version=18,
                                 input_names=list(inputs), output_names=["out"],
                                 dynamic_shapes={k: {0: batch} for k in inputs}, verbose=False)
    prog.save(str(path))


@torch.no_grad()
def compare(name: str, unet, resolution: int, latent_factor: int, seq_len: int, cfg: bool, runs: int,
            tmp: Path) -> dict:
    unet = unet.eval()
    fn, args = component_call("unet", unet, resolution=resolution, cfg=cfg, latent_factor=latent_factor,
                              seq_len=seq_len)
    names = ["sample", "timestep", "encoder_hidden_states", "timestep_cond"][:len(args)]
    inputs = dict(zip(names, args))
    inputs["timestep"] = inputs["timestep"].float()
    fp32, int8 = tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx"
    t0 = time.perf_counter()
    export_unet(unet, inputs, fp32)
    export_s = time.perf_counter() - t0
    quantize_dynamic_matmul(fp32, int8)
    sessions = {"onnxruntime fp32": session(fp32), "onnxruntime int8 (MatMul)": session(int8)}
    ref = fn(*args)
    runners = {"torch eager": lambda: fn(*args)}
    parity = {}
    for label, sess in sessions.items():
        runners[label] = lambda s=sess: run_session(s, inputs)
        parity[label] = Parity.of(runners[label](), ref).as_dict()
    for r in runners.values():  # warm-up
        r()
    times = {k: [] for k in runners}
    for _ in range(runs):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch eager"])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        size = fp32.stat().st_size if k == "onnxruntime fp32" else int8.stat().st_size if "int8" in k else None
        rows.append({"model": name, "runtime": k, "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts),
                     "speed_vs_torch": base / med, "file_mb": None if size is None else size / 2**20,
                     "parity": parity.get(k)})
        print(f"{name:28s} {k:28s} {1e3 * med:9.1f} ms  {base / med:5.2f}x torch", flush=True)
    return {"model": name, "resolution": resolution, "cfg": cfg, "export_s": export_s, "rows": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| model | runtime | median ms/step | speed vs torch | file MB | parity max abs / PSNR dB |",
             "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            par = r["parity"] or {}
            size = "" if r["file_mb"] is None else f"{r['file_mb']:.1f}"
            check = f"{par['max_abs']:.1e} / {par['psnr_db']}" if par else "reference"
            lines.append(f"| {r['model']} | {r['runtime']} | {r['median_ms']:.1f} | {r['speed_vs_torch']:.2f}x | "
                         f"{size} | {check} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["default"],
                    help="model folders or shipped model names, each optionally LABEL=NAME")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sd-runs", type=int, default=3, help="runs for the SD-scale UNet (0: skip it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from pocketdiff.models import presets
    from pocketdiff.models.registry import resolve_model
    from pocketdiff.pipeline import Pipeline

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            label, _, name = model.rpartition("=")
            folder = resolve_model(name)
            pipe = Pipeline.from_folder(folder, runner="eager")
            cfg = not getattr(pipe.unet.config, "time_cond_proj_dim", None)
            results.append(compare(label or folder.name, pipe.unet, pipe.default_size, pipe.vae_scale_factor,
                                   pipe.tokenizer.model_max_length, cfg, args.runs, Path(tmp)))
        if args.sd_runs:
            torch.manual_seed(0)
            results.append(compare("bk-sdm-tiny (SD scale, 512 px)", presets.compact_unet("bk-tiny"), 512, 8, 77,
                                   False, args.sd_runs, Path(tmp)))
    print("\n" + markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": torch.get_num_threads(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
