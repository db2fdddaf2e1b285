"""An SD-scale 512 px text-to-image generation on this CPU, end to end (issue 26): the fast path against the untiled
torch path and against diffusers' pipeline with the same components.

Random weights (structure and cost only): SD-v1.5's text encoder, a compact UNet preset (``--unet``, default the
MobileDiffusion-style ``mobile-sd``; ``--searched``: with the blocks removed that ``benchmarks/search_sd.py``'s
search of it removed) at 2 DDIM steps without CFG (a step-distilled or LCM student's setting), and
either SD-v1.5's VAE or a TAESD-sized tiny decoder (diffusers' ``AutoencoderTiny`` at its default config: 64
channels per block, SD's 4 latent channels). The folders are written once to a temporary directory; the int8
folder by ``pocketdiff quantize`` (int8 weights in memory, dequantized per call) of the UNet and text encoder.

Every configuration runs in a fresh process: load, one warm-up generation, then ``--runs`` timed ones (the
median is ``s/image``). ``peak MiB`` is the process's kernel VmHWM over the whole run (load included): what the
machine must have free. The onnxruntime rows load the export that ``--backend auto`` makes and caches (made in
its own process first, timed as ``export s``, not counted in the rows); the int8 onnxruntime row is that export
with onnxruntime's dynamic int8 on its UNet's MatMul nodes. Targets: <= 8 s per image and <= 2 GB peak.

    python benchmarks/sd_fast_path.py [--unet mobile-sd] [--searched] [--runs 2] [--threads 2]

Writes docs/results/sd_fast_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PROMPT = "a photo of a cat"

CONFIGS = {
    # label: (folder, runner) -- runner: torch | auto | onnxruntime-int8 | diffusers; torch options
    "torch, SD VAE (untiled)": ("sdvae", "torch", {}),
    "torch, tiny decoder": ("tiny", "torch", {}),
    "torch, tiny decoder, int8": ("tiny-int8", "torch", {}),
    "torch, tiny decoder, int8, UNet streamed": ("tiny-int8", "torch", {"stream_unet": True}),
    "default (--backend auto), tiny decoder": ("tiny", "auto", {}),
    "onnxruntime int8 MatMul, tiny decoder": ("tiny", "onnxruntime-int8", {}),
    "diffusers, tiny decoder": ("tiny", "diffusers", {}),
    "diffusers, SD VAE": ("sdvae", "diffusers", {}),
}


def build_unet(unet_name: str, searched: bool):
    """The preset, with the blocks that ``benchmarks/search_sd.py``'s search of it removed when ``searched``
    (:mod:`pocketdiff.blocks.surgery`: pocketdiff and its exports skip them)."""
    from pocketdiff.blocks.surgery import remove_blocks
    from pocketdiff.models import presets

    unet = presets.build(unet_name)[1]
    if not searched:
        return unet
    report = json.loads((RESULTS / "search_sd.json").read_text())
    found = [x for x in report["searches"] if x["base"] == unet_name]
    if not found:
        raise SystemExit(f"--searched: docs/results/search_sd.json has no search of {unet_name}; run "
                         f"python benchmarks/search_sd.py --search {unet_name}:4 first")
    return remove_blocks(unet, found[0]["removed"])


def build_folders(root: Path, unet_name: str, searched: bool) -> None:
    """``sdvae`` (SD-v1.5 text encoder + the UNet + SD's VAE), ``tiny`` (the same with AutoencoderTiny) and
    ``tiny-int8`` (``tiny`` quantized): the same random weights in each."""
    import torch
    from diffusers import AutoencoderTiny

    from pocketdiff.folder import save_components
    from pocketdiff.models import presets
    from pocketdiff.quantize import quantize_folder
    from pocketdiff.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tok = build_clip_tokenizer(["a", "photo", "of", "cat"], model_max_length=77)
    unet, text = build_unet(unet_name, searched), presets.text_encoder_from_config(presets.SD15_TEXT)
    sched = dict(presets.SD15_SCHEDULER)
    save_components(root / "sdvae", unet, presets.vae_from_config(presets.SD15_VAE), text, tok, sched)
    save_components(root / "tiny", unet, AutoencoderTiny(), text, tok, sched)
    quantize_folder(root / "tiny", root / "tiny-int8", components=("unet", "text_encoder"), max_rel_error=0.2)


def _pocketdiff_pipe(folder: Path, runner: str, options: dict, threads: int):
    from pocketdiff.loader import load_generator

    if runner == "onnxruntime-int8":
        return load_generator(folder, folder.name, backend="onnxruntime", threads=threads)
    return load_generator(folder, folder.name, backend=runner, threads=threads, **options)


def _diffusers_pipe(folder: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def child(folder: str, runner: str, options: dict, runs: int, threads: int) -> dict:
    """Runs in a fresh process: load, warm up, time ``runs`` generations; the process's peak RSS."""
    import torch

    from pocketdiff.bench.measure import _status_kb
    from pocketdiff.threads import apply_threads

    apply_threads(threads)
    t0 = time.perf_counter()
    if runner == "diffusers":
        pipe = _diffusers_pipe(Path(folder))

        def generate():
            pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, height=512, width=512,
                 generator=torch.Generator().manual_seed(0))
            return {}
    else:
        pipe = _pocketdiff_pipe(Path(folder), runner, options, threads)

        def generate():
            t = pipe(PROMPT, steps=2, sampler="ddim", guidance=1.0, seed=0, height=512, width=512).timings
            return {"text_s": t.text_encoder, "unet_s": sum(t.unet_steps), "decode_s": t.decoder}
    load_s = time.perf_counter() - t0
    times, parts = [], []
    with torch.inference_mode():
        for _ in range(runs + 1):
            t1 = time.perf_counter()
            parts.append(generate())
            times.append(time.perf_counter() - t1)
    timed = parts[1:]
    split = {k: statistics.median(p[k] for p in timed) for k in (timed[0] if timed and timed[0] else {})}
    return {"load_s": load_s, "first_s": times[0], "s_per_image": statistics.median(times[1:]),
            "peak_mb": _status_kb("VmHWM") / 1024, "backend": getattr(pipe, "backend", runner), **split}


def peak_and_macs(unet_name: str, searched: bool, threads: int) -> dict:
    """This machine's fp32 GEMM peak at ``threads`` and the UNet's MACs per 512 px step (batch 1, no CFG), counted
    on the meta device (no weights in memory)."""
    import torch

    from pocketdiff.bench.measure import component_call, count_macs, gemm_peak
    from pocketdiff.threads import apply_threads

    apply_threads(threads)
    with torch.device("meta"):
        unet = build_unet(unet_name, searched)
    fn, inputs = component_call("unet", unet, resolution=512, batch=1, cfg=False)
    return {"peak": gemm_peak(), "unet_gmacs": count_macs(fn, *inputs) / 1e9}


def in_fresh_process(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"child {args[:3]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare_int8_export(root: Path, cache: Path) -> Path:
    """A copy of the cached export of ``tiny`` with onnxruntime's dynamic int8 on its UNet's MatMul nodes."""
    from pocketdiff.export.onnx import quantize_dynamic_matmul

    entries = [p for p in (cache / "onnx").iterdir() if p.is_dir()]
    if len(entries) != 1:
        raise RuntimeError(f"expected one cached export in {cache / 'onnx'}, found {len(entries)}")
    dest = root / "tiny-onnx-int8"
    shutil.copytree(entries[0], dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    unet = dest / manifest["components"]["unet"]["file"]
    for p in dest.glob(unet.name + "*"):
        p.unlink()  # the fp32 graph and its external weights
    quantize_dynamic_matmul(entries[0] / manifest["components"]["unet"]["file"], unet)
    return dest


def markdown(report: dict) -> str:
    lines = ["| configuration | runs on | s/image | text s | UNet s (2 steps) | UNet % of GEMM peak | decode s | "
             "first call s | load s | peak MiB | s/image vs untiled torch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = report["rows"][0]["s_per_image"]

    def f(r, k):
        return f"{r[k]:.2f}" if k in r else "-"

    def share(r):
        return f"{100 * r['unet_peak_share']:.0f}%" if "unet_peak_share" in r else "-"
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['backend']} | {r['s_per_image']:.2f} | {f(r, 'text_s')} | "
                     f"{f(r, 'unet_s')} | {share(r)} | {f(r, 'decode_s')} | {r['first_s']:.2f} | {r['load_s']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['s_per_image'] / base:.2f}x |")
    return "\n".join(lines)


def run_all(args, root: Path, cache: Path) -> dict:
    env = {"POCKETDIFF_CACHE": str(cache)}
    t0 = time.perf_counter()
    searched = ["--searched"] if args.searched else []
    built = in_fresh_process(["--build", str(root), "--unet", args.unet, *searched])
    t1 = time.perf_counter()
    warm = in_fresh_process(["--child", str(root / "tiny"), "auto", "{}", "0", str(args.threads)], env)
    export_s = time.perf_counter() - t1
    folders = {"onnxruntime-int8": prepare_int8_export(root, cache)}
    rows = []
    for label, (folder, runner, options) in CONFIGS.items():
        path = folders.get(runner, root / folder)
        r = in_fresh_process(["--child", str(path), runner, json.dumps(options), str(args.runs), str(args.threads)],
                             env)
        rows.append({"config": label, **r})
        print(f"{label:45s} {r['backend']:12s} {r['s_per_image']:7.2f} s/image {r['peak_mb']:7.0f} MiB", flush=True)
    limit = in_fresh_process(["--peak", "--unet", args.unet, *searched, "--threads", str(args.threads)])
    for r in rows:
        if "unet_s" in r:
            r["unet_gflops"] = 2 * limit["unet_gmacs"] * 2 / r["unet_s"]  # 2 FLOPs per MAC, 2 steps
            r["unet_peak_share"] = r["unet_gflops"] / limit["peak"]["gflops"]
    return {"unet": args.unet, "searched": args.searched, "threads": args.threads, "runs": args.runs, "build_s": t1 - t0, **limit,
            "export_s": export_s, "export_check": warm, "sizes_mb": built, "rows": rows,
            "command": "python benchmarks/sd_fast_path.py " + " ".join(sys.argv[1:])}


def folder_sizes(root: Path) -> dict:
    return {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
            for p in sorted(root.iterdir()) if p.is_dir()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="mobile-sd", help="UNet preset of pocketdiff.models.presets.build (e.g. mobile-sd, bk-sdm-tiny)")
    ap.add_argument("--searched", action="store_true",
                    help="remove the blocks that docs/results/search_sd.json's search of --unet removed")
    ap.add_argument("--runs", type=int, default=2, help="timed generations per configuration (after a warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "sd_fast_path.json"))
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        print(json.dumps(peak_and_macs(args.unet, args.searched, args.threads)))
        return 0
    if args.build:
        build_folders(Path(args.build), args.unet, args.searched)
        print(json.dumps(folder_sizes(Path(args.build))))
        return 0
    if args.child:
        folder, runner, options, runs, threads = args.child
        print(json.dumps(child(folder, runner, json.loads(options), int(runs), int(threads))))
        return 0
    with tempfile.TemporaryDirectory(prefix="sd-fast-") as tmp:
        report = run_all(args, Path(tmp) / "models", Path(tmp) / "cache")
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
