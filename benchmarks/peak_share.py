"""Each component's achieved GFLOP/s against this machine's fp32 GEMM peak, measured in the same process.

    python benchmarks/peak_share.py [--runs 3] [--sd-runs 2] [--threads N]

Rows: SD-v1.5's UNet at 512 px (random weights from its config; one step of a CFG batch of 2) and the text
encoder, UNet step and decoder of each shipped model, on torch (the path whose MACs FlopCounterMode counts).
The GEMM peak is measured before and after the rows; the share uses their mean. Writes docs/results/peak.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shapes-teacher", "shapes-mobile-lite", "shapes-lcm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sd-runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "peak.json"))
    args = ap.parse_args()
    from pocketdiff.bench import measure
    from pocketdiff.models import presets
    from pocketdiff.models.registry import resolve_model
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.threads import apply_threads

    threads, why = apply_threads(args.threads)
    before = measure.gemm_peak()
    rows = []
    for name in MODELS:
        rows += measure.bench_pipeline(Pipeline.from_folder(resolve_model(name)), runs=args.runs)
    kind, unet = presets.build("sd15-unet")
    rows.append(measure.bench_component("sd15-unet", kind, unet, resolution=512, runs=args.sd_runs, warmup=1))
    after = measure.gemm_peak()
    peak = {"gflops": round((before["gflops"] + after["gflops"]) / 2, 2), "before": before, "after": after}
    rows = measure.with_peak(rows, peak)
    print(measure.format_table(rows))
    print(f"fp32 GEMM peak: {before['gflops']:.1f} before, {after['gflops']:.1f} after ({threads} thread(s), {why})")
    Path(args.out).write_text(json.dumps({"threads": threads, "threads_why": why, "peak": peak, "rows": rows},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
