"""`pocketdiff search` at SD-v1.5 scale (random weights: the structure and the latency only).

    python benchmarks/search_sd.py [--target-ratio 0.2] [--threads 1]

1. The latency table of SD-v1.5's UNet at 512 px on this CPU (torch, one CFG batch of 2), per ResNet / transformer.
2. The search to ``target-ratio`` of the measured step. With random weights no quality can be measured, so the
   proxy is *function preservation*: the squared difference between the pruned and the full UNet's outputs on 8
   fixed random inputs at 128 px (16x16 latents, random text states), per ms saved. It ranks blocks by how much of
   the random network's output they carry: a structural ranking, not a quality one.
3. The searched UNet measured against SD-v1.5, BK-SDM-Tiny and the MobileDiffusion-style ``mobile-sd``, interleaved
   in one process: active params, GMACs and median ms of a 512 px step; the table's prediction beside it.

Writes docs/results/search_sd.json (and the table, search_sd_lut.json, reused by a rerun on as many threads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def function_set(unet, n: int = 8, side: int = 16, seed: int = 0):
    """A ValidationSet whose target is the full UNet's own output (function preservation)."""
    from pocketdiff.search.proxy import ValidationSet

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, unet.config.in_channels, side, side, generator=g)
    t = torch.linspace(50, 950, n).round().long()
    states = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        target = torch.cat([unet(x[i:i + 2], t[i:i + 2], encoder_hidden_states=states[i:i + 2]).sample
                            for i in range(0, n, 2)])
    return ValidationSet(x, t, states, target, torch.zeros_like(x))


def measure_rows(models: dict, runs: int) -> list[dict]:
    """Interleaved 512 px steps (CFG batch of 2): rounds over the models, the median of each."""
    import statistics
    import time

    from pocketdiff.bench.measure import component_call, count_macs
    from pocketdiff.models.skipping import removed as skipped
    from pocketdiff.models.surgery import count_active_params

    calls, times, rows = {}, {}, []
    for name, (unet, cut) in models.items():
        calls[name] = (component_call("unet", unet, resolution=512, batch=1), unet, cut)
        times[name] = []
    for _ in range(runs + 1):  # the first round warms up
        for name, ((fn, inputs), unet, cut) in calls.items():
            with torch.inference_mode(), skipped(unet, cut):
                t0 = time.perf_counter()
                fn(*inputs)
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name, ((fn, inputs), unet, cut) in calls.items():
        with skipped(unet, cut):
            macs = count_macs(fn, *inputs)
            params = count_active_params(unet, cut)
        rows.append({"model": name, "params_m": params / 1e6, "gmacs": macs / 1e9,
                     "median_ms": statistics.median(times[name][1:])})
    base = rows[0]["median_ms"]
    for r in rows:
        r["vs_sd15"] = r["median_ms"] / base
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-ratio", type=float, default=0.2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per block and per model")
    ap.add_argument("--actions-per-round", type=int, default=4)
    ap.add_argument("--lut", default=str(ROOT / "docs" / "results" / "search_sd_lut.json"),
                    help="the latency table: read when it exists (and is of this UNet), else measured and written")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "search_sd.json"))
    args = ap.parse_args()
    from pocketdiff.bench.lut import LatencyTable, arch_digest, measure_lut
    from pocketdiff.models import presets
    from pocketdiff.search.evolve import SearchConfig, evolve
    from pocketdiff.threads import apply_threads

    threads, why = apply_threads(args.threads)
    torch.manual_seed(0)
    sd = presets.build("sd15-unet")[1].eval()
    lut = None
    if Path(args.lut).is_file():
        lut = LatencyTable.load(args.lut)
        lut = lut if lut.arch == arch_digest(sd) and lut.threads == threads else None
    if lut is None:
        lut = measure_lut(sd, resolution=512, runs=args.runs, warmup=1)
        lut.save(args.lut)
    print(f"table: {len(lut.blocks)} blocks, step {lut.total_ms:.0f} ms", flush=True)
    target = args.target_ratio * lut.total_ms
    result = evolve(sd, lut, function_set(sd), SearchConfig(target, actions_per_round=args.actions_per_round),
                    log=lambda r: print(f"round {r['round']}: {[e['block'] for e in r['executed']]} -> "
                                        f"{r['predicted_ms']:.0f} ms", flush=True))
    models = {"sd15-unet": (sd, []), "searched": (sd, result.removed),
              "bk-sdm-tiny": (presets.build("bk-sdm-tiny")[1].eval(), []),
              "mobile-sd": (presets.build("mobile-sd")[1].eval(), [])}
    rows = measure_rows(models, args.runs)
    for r in rows:
        print(f"{r['model']:12s} {r['params_m']:8.1f} M {r['gmacs']:8.1f} GMACs {r['median_ms']:9.0f} ms "
              f"{r['vs_sd15']:.2f}x")
    by_kind = {k: sum(1 for n in result.removed if lut.blocks[n]["type"] == k) for k in ("ResnetBlock2D",
                                                                                          "Transformer2DModel")}
    report = {"threads": threads, "threads_why": why, "target_ratio": args.target_ratio, "target_ms": target,
              "table_total_ms": lut.total_ms, "predicted_ms": result.predicted_ms, "removed": result.removed,
              "removed_by_type": by_kind, "blocks": len(lut.blocks), "rounds": len(result.rounds), "rows": rows,
              "command": "python benchmarks/search_sd.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
