"""pocketdiff's default path against diffusers' StableDiffusionPipeline on the shipped models, same run.

    python benchmarks/default_vs_diffusers.py [--repeats 5] [--batches 1 8] [--threads N]

pocketdiff: ``load_generator(model)`` with its defaults (``--backend auto``: onnxruntime through the cached ONNX
export, made before timing), the model card's sampler, steps and guidance. diffusers: the same folder through
``StableDiffusionPipeline.from_pretrained`` with the scheduler class of that sampler (from the folder's scheduler
config) and the same steps and guidance (a UNet with a guidance embedding gets it from diffusers as well). Both in
this process, interleaved after a warm-up; medians of seconds per image and their ratio. Writes
docs/results/default_vs_diffusers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shapes-teacher", "shapes-mobile-lite", "shapes-lcm")
PROMPT = "a small red star at the top left on a blue background"


def diffusers_pipe(folder: Path, sampler: str):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                           StableDiffusionPipeline)

    classes = {"dpmpp_2m": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
               "lcm": LCMScheduler}
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    ref.scheduler = classes[sampler].from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def unet_rates(ours, ref, batch: int, peak: float, runs: int = 10) -> dict:
    """One UNet step of each pipeline (the call its sampler makes: a CFG batch of 2B where it guides) with the
    same inputs: ms, GFLOP/s (MACs counted on diffusers' torch module) and share of the fp32 GEMM ``peak``."""
    from pocketdiff.bench.measure import component_call, count_macs, time_call

    cfg = ours.settings().guidance != 1.0 and not getattr(ref.unet.config, "time_cond_proj_dim", None)
    kw = dict(resolution=ours.default_size, batch=batch, cfg=cfg, seq_len=int(ours.tokenizer.model_max_length),
              latent_factor=ours.vae_scale_factor)
    fn_t, inputs = component_call("unet", ref.unet, **kw)
    if len(inputs) == 4:  # with the guidance embedding
        def fn_o(x, t, text, cond):
            return ours.unet(x, t, encoder_hidden_states=text, timestep_cond=cond)[0]
    else:
        def fn_o(x, t, text):
            return ours.unet(x, t, encoder_hidden_states=text)[0]
    macs = count_macs(fn_t, *inputs)
    out = {"unet_gmacs": macs / 1e9}
    with torch.inference_mode():
        for label, fn in (("torch", fn_t), (ours.backend, fn_o)):
            ms = time_call(lambda: fn(*inputs), runs=runs, warmup=3)["median_ms"]
            gflops = 2 * macs / (ms / 1000) / 1e9
            out[f"unet_ms_{label}"], out[f"unet_gflops_{label}"] = ms, gflops
            out[f"unet_peak_pct_{label}"] = 100 * gflops / peak
    out["ceiling_vs_torch"] = peak / out["unet_gflops_torch"]  # the most a UNet at the GEMM peak could gain
    return out


def run_model(name: str, batches: list[int], repeats: int, peak: float) -> list[dict]:
    from pocketdiff.loader import load_generator
    from pocketdiff.models.registry import resolve_model

    folder = resolve_model(name)
    ours = load_generator(folder, name, threads=torch.get_num_threads())  # the default path (exports once)
    chosen = ours.settings()
    ref = diffusers_pipe(folder, chosen.sampler)
    rows = []
    for batch in batches:
        prompts = [PROMPT] * batch

        def run_ours():
            ours(prompts, steps=chosen.steps, sampler=chosen.sampler, guidance=chosen.guidance, seed=0)

        def run_ref():
            ref(prompts, num_inference_steps=chosen.steps, guidance_scale=chosen.guidance,
                generator=[torch.Generator().manual_seed(i) for i in range(batch)])

        run_ours(), run_ref()  # warm-up
        a, b = [], []
        with torch.inference_mode():
            for _ in range(repeats):
                for fn, acc in ((run_ours, a), (run_ref, b)):
                    t0 = time.perf_counter()
                    fn()
                    acc.append((time.perf_counter() - t0) / batch)
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append({"model": name, "backend": ours.backend, "sampler": chosen.sampler, "steps": chosen.steps,
                     "guidance": chosen.guidance, "batch": batch, "repeats": repeats,
                     "pocketdiff_s_per_image": ma, "diffusers_s_per_image": mb, "speedup": mb / ma,
                     **unet_rates(ours, ref, batch, peak)})
        r = rows[-1]
        print(f"{name} batch {batch}: pocketdiff {ma:.3f} s/image ({ours.backend}), diffusers {mb:.3f}: "
              f"{mb / ma:.2f}x; UNet step {r['unet_ms_torch']:.1f} ms torch ({r['unet_peak_pct_torch']:.0f}% of "
              f"peak), {r[f'unet_ms_{ours.backend}']:.1f} ms {ours.backend}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "default_vs_diffusers.json"))
    args = ap.parse_args()
    from pocketdiff.threads import apply_threads

    from pocketdiff.bench.measure import gemm_peak

    threads, why = apply_threads(args.threads)
    peak = gemm_peak()
    rows = [r for name in MODELS for r in run_model(name, args.batches, args.repeats, peak["gflops"])]
    Path(args.out).write_text(json.dumps({"threads": threads, "threads_why": why, "torch": torch.__version__,
                                          "gemm_peak": peak, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
