"""Model-level tiling: peak memory and latency of a 512 px SD-scale generation, with and without.

The model is SD-v1.5's VAE and text encoder with a compact UNet preset (BK-SDM-Tiny by default),
random weights, saved once to a temporary folder. Every configuration runs in its own fresh process
(so one configuration's allocator state cannot raise or lower another's): it loads the folder, enables
the tiling knobs, returns freed heap to the OS (``malloc_trim``), resets the kernel's peak-RSS mark and
runs one timed generation (no warm-up: a warm-up's freed memory stays cached by the allocator). The
peak is taken separately while denoising (text encoder + UNet steps) and while decoding (the mark is
reset in between); weights are memory-mapped, so they count once touched. Ratios are to the untiled
run of the same invocation.

    python benchmarks/tiling_memory.py [--unet bk-tiny] [--steps 2] [--json docs/results/tiling_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIGS = {
    # name: Pipeline.enable_tiling keyword arguments
    "untiled": {},
    "attention chunks (1024 queries)": {"attention_chunk": 1024},
    "VAE tiles (128 px)": {"vae_tile": 128},
    "UNet streamed": {"stream_unet": True},
    "all three": {"attention_chunk": 1024, "vae_tile": 128, "stream_unet": True},
}


def build_folder(path: Path, unet: str) -> None:
    import torch

    from pocketdiff.folder import save_components
    from pocketdiff.models import presets
    from pocketdiff.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tok = build_clip_tokenizer(["a", "photo", "of", "cat"], model_max_length=77)
    save_components(path, presets.compact_unet(unet), presets.vae_from_config(presets.SD15_VAE),
                    presets.text_encoder_from_config(presets.SD15_TEXT), tok, dict(presets.SD15_SCHEDULER))


def child(folder: str, options: dict, steps: int, resolution: int) -> dict:
    """Runs in a fresh process: returns resident/peak MiB and seconds of one generation."""
    import torch

    from pocketdiff.bench.measure import _reset_peak_rss, _status_kb
    from pocketdiff.pipeline import Pipeline

    pipe = Pipeline.from_folder(folder, runner="eager").enable_tiling(**options)
    kw = dict(steps=steps, sampler="ddim", guidance=1.0, seed=0, height=resolution, width=resolution,
              output_type="np")
    import ctypes
    import gc

    with torch.inference_mode():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # loading's freed buffers back to the OS
        resident = _status_kb("VmRSS") / 1024
        exact = _reset_peak_rss()
        t0 = time.perf_counter()
        latents = pipe("a photo of a cat", **{**kw, "output_type": "latent"}).latents
        t1 = time.perf_counter()
        peak_denoise = _status_kb("VmHWM") / 1024
        _reset_peak_rss()
        pipe.decode(latents)
        t2 = time.perf_counter()
        peak_decode = _status_kb("VmHWM") / 1024
    return {"resident_mb": resident, "peak_mb": max(peak_denoise, peak_decode), "peak_denoise_mb": peak_denoise,
            "peak_decode_mb": peak_decode, "seconds": t2 - t0, "denoise_s": t1 - t0, "decode_s": t2 - t1,
            "peak_exact": exact}


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | peak MiB | peak vs untiled | peak while denoising | peak while decoding | seconds | "
             "decoding s | time vs untiled |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['peak_mb']:.0f} | {r['peak_ratio']:.2f}x | {r['peak_denoise_mb']:.0f} | "
                     f"{r['peak_decode_mb']:.0f} | {r['seconds']:.2f} | {r['decode_s']:.2f} | {r['time_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="bk-tiny", help="compact UNet preset (pocketdiff.models.compact)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, options = json.loads(args.child)
        print(json.dumps(child(folder, options, args.steps, args.resolution)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        print(f"building a random SD-scale model (UNet {args.unet}) in {folder} ...", flush=True)
        build_folder(folder, args.unet)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        for name, options in CONFIGS.items():
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--resolution",
                                  str(args.resolution), "--child", json.dumps([str(folder), options])],
                                 capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"config": name, "options": options, **r})
            print(f"{name:34s} peak {r['peak_mb']:6.0f} MiB (denoising {r['peak_denoise_mb']:.0f}, decoding "
                  f"{r['peak_decode_mb']:.0f})  {r['seconds']:6.2f} s (decoding {r['decode_s']:.2f} s)", flush=True)
    base = rows[0]
    for r in rows:
        r["peak_ratio"] = r["peak_mb"] / base["peak_mb"]
        r["time_ratio"] = r["seconds"] / base["seconds"]
    print("\n" + markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"unet": args.unet, "steps": args.steps, "resolution": args.resolution, "guidance": 1.0,
                "batch": 1, "threads": os.cpu_count()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
