"""Model-level tiling: peak memory and latency of a 512 px SD-scale generation, with and without.

The model is SD-v1.5's VAE and text encoder with a compact UNet preset (BK-SDM-Tiny by default),
random weights, saved once to a temporary folder. Every configuration runs in its own fresh process
(so one configuration's allocator state cannot lower another's peak): it loads the folder, enables
the tiling knobs, runs one warm-up generation, resets the kernel's peak-RSS mark, and runs one timed
generation. Reported: RSS before generating (weights resident), the peak during the generation, and
the seconds it took, with ratios to the untiled run of the same invocation.

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
    "VAE tiles (256 px)": {"vae_tile": 256},
    "UNet streamed": {"stream_unet": True},
    "all three": {"attention_chunk": 1024, "vae_tile": 256, "stream_unet": True},
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
    with torch.inference_mode():
        pipe("a photo of a cat", **kw)  # warm-up
        import gc

        gc.collect()
        resident = _status_kb("VmRSS") / 1024
        exact = _reset_peak_rss()
        t0 = time.perf_counter()
        pipe("a photo of a cat", **kw)
        seconds = time.perf_counter() - t0
    return {"resident_mb": resident, "peak_mb": _status_kb("VmHWM") / 1024, "seconds": seconds,
            "peak_exact": exact}


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
            print(f"{name:34s} resident {r['resident_mb']:8.0f} MiB  peak {r['peak_mb']:8.0f} MiB  "
                  f"{r['seconds']:7.2f} s", flush=True)
    base = rows[0]
    for r in rows:
        r["peak_ratio"] = r["peak_mb"] / base["peak_mb"]
        r["time_ratio"] = r["seconds"] / base["seconds"]
    print("\n| configuration | resident MiB | peak MiB | peak vs untiled | seconds | time vs untiled |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['resident_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_ratio']:.2f}x | "
              f"{r['seconds']:.2f} | {r['time_ratio']:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"unet": args.unet, "steps": args.steps, "resolution": args.resolution, "guidance": 1.0,
                "batch": 1, "threads": os.cpu_count()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
