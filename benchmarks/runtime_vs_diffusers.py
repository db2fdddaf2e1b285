"""pocketdiff vs diffusers' StableDiffusionPipeline: same weights, prompts, steps, batch, seed.

Both run in this one process, interleaved (A B A B ...), after warm-up, so machine noise hits both
alike; the table gives medians and the same-run ratio. pocketdiff's one-off cost of tracing its UNet
(the first call of a new shape) is reported separately, as is the time of a cold first generation.

    python benchmarks/runtime_vs_diffusers.py [--quick] [--json docs/results/runtime_vs_diffusers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.models import presets  # noqa: E402
from pocketdiff.models.tiny import tiny_components  # noqa: E402
from pocketdiff.pipeline import Pipeline  # noqa: E402


def small_components() -> dict:
    """The Shapes teacher's architecture (UNet, VAE, CLIP text encoder), random weights, 64 px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pocketdiff.train.autoencoder import SHAPES_VAE
    from pocketdiff.text.tokenizer import shapes_tokenizer
    from pocketdiff.train.teacher import SHAPES_SCHEDULER, SHAPES_UNET, TeacherRecipe, build_text_encoder

    torch.manual_seed(0)
    tok = shapes_tokenizer()
    return dict(unet=UNet2DConditionModel(**SHAPES_UNET).eval(), vae=AutoencoderKL(**SHAPES_VAE).eval(),
                text_encoder=build_text_encoder(TeacherRecipe(), tok).eval(), tokenizer=tok,
                scheduler_config=dict(SHAPES_SCHEDULER))


def sd15_components() -> dict:
    from pocketdiff.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tok = build_clip_tokenizer(["a", "photo", "of", "cat"], model_max_length=77)
    return dict(unet=presets.unet_from_config(presets.SD15_UNET), vae=presets.vae_from_config(presets.SD15_VAE),
                text_encoder=presets.text_encoder_from_config(presets.SD15_TEXT), tokenizer=tok,
                scheduler_config=dict(presets.SD15_SCHEDULER))


CASES = {
    # name: (components factory, resolution, steps, batch, repeats)
    "tiny-random (shipped)": (lambda: tiny_components(0), 16, 25, 1, 15),
    "Shapes teacher architecture (64px)": (small_components, 64, 25, 1, 9),
    "Shapes teacher architecture, batch 4": (small_components, 64, 25, 4, 5),
    "SD-v1.5 (random weights, 128px)": (sd15_components, 128, 4, 1, 2),
}


def run_case(name: str, factory, resolution: int, steps: int, batch: int, repeats: int) -> dict:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    c = factory()
    ours = Pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], runner="auto")
    ref = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                                  scheduler=DPMSolverMultistepScheduler.from_config(c["scheduler_config"]),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    prompts = ["a small red star at the top left on a blue background"] * batch

    def run_ours():
        ours.runner.plan_calls(steps * 100)  # a long-running session (server, eval, --prompts-file)
        ours(prompts, steps=steps, sampler="dpmpp_2m", guidance=7.5, seed=0, height=resolution, width=resolution)

    def run_ref():
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        ref(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens, height=resolution,
            width=resolution)

    t0 = time.perf_counter()
    run_ref()
    ref_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_ours()  # first call: eager until the cost model decides to trace, then traced
    ours_cold = time.perf_counter() - t0
    run_ours()
    run_ref()
    a, b = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_ours()
            a.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_ref()
            b.append(time.perf_counter() - t0)
    ma, mb = statistics.median(a), statistics.median(b)
    return {"case": name, "resolution": resolution, "steps": steps, "batch": batch, "repeats": repeats,
            "pocketdiff_s": ma, "diffusers_s": mb, "speedup": mb / ma, "traced": bool(ours.runner._traced),
            "pocketdiff_first_call_s": ours_cold, "diffusers_first_call_s": ref_cold,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "allocator": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | px | steps | batch | pocketdiff s (median) | diffusers s (median) | speed-up | "
             "first call: pocketdiff / diffusers s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['resolution']} | {r['steps']} | {r['batch']} | {r['pocketdiff_s']:.3f} | "
                     f"{r['diffusers_s']:.3f} | **{r['speedup']:.2f}x** | {r['pocketdiff_first_call_s']:.2f} / "
                     f"{r['diffusers_first_call_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models only")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "runtime_vs_diffusers.json")
    args = ap.parse_args(argv)
    rows = []
    for name, (factory, res, steps, batch, repeats) in CASES.items():
        if args.quick and "SD" in name:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run_case(name, factory, res, steps, batch, repeats))
        print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
