"""`pocketdiff search` at SD-v1.5 scale (random weights: the structure and the latency only).

    python benchmarks/search_sd.py [--target-ratio 0.2] [--search sd15-unet:0 --search mobile-sd:4] [--threads 1]

1. Latency tables at 512 px on this CPU (torch, one CFG batch of 2), per ResNet / transformer block, of each
   searched base UNet (SD-v1.5's, and the MobileDiffusion-style ``mobile-sd``: narrower, attention at low
   resolution only); cached in docs/results/search_sd_lut_<base>.json and reused on as many threads.
2. Each search (``BASE:KEEP``: never remove the last KEEP transformers) to ``target-ratio`` of SD-v1.5's tabled
   step. With random weights no quality can be measured, so the proxy is *function preservation*: the squared
   difference between the pruned and the full UNet's outputs on 8 fixed random inputs at 128 px (16x16 latents,
   random text states), per ms saved: a structural ranking, not a quality one.
3. The searched UNets measured against SD-v1.5, BK-SDM-Tiny and ``mobile-sd``, interleaved in one process: active
   params, GMACs and median ms of a 512 px step.

Writes docs/results/search_sd.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


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
    from pocketdiff.blocks.skipping import removed as skipped
    from pocketdiff.blocks.surgery import count_active_params

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


def table(unet, path: Path, runs: int, threads: int):
    """The 512 px latency table of ``unet``: read from ``path`` when it is of this UNet and thread count."""
    from pocketdiff.bench.lut import LatencyTable, arch_digest, measure_lut

    if path.is_file():
        lut = LatencyTable.load(path)
        if lut.arch == arch_digest(unet) and lut.threads == threads:
            return lut
    lut = measure_lut(unet, resolution=512, runs=runs, warmup=1)
    lut.save(path)
    return lut


def search(base: str, unet, sd_ms: float, args, threads: int, keep: int) -> dict:
    from pocketdiff.search.evolve import SearchConfig, evolve

    lut = table(unet, RESULTS / f"search_sd_lut_{base}.json", args.runs, threads)
    target = args.target_ratio * sd_ms
    result = evolve(unet, lut, function_set(unet), SearchConfig(target, actions_per_round=args.actions_per_round,
                                                                keep_attention=keep),
                    log=lambda r: print(f"{base} keep {keep}, round {r['round']}: "
                                        f"{[e['block'] for e in r['executed']]} -> {r['predicted_ms']:.0f} ms",
                                        flush=True))
    kinds = {k: sum(1 for n in result.removed if lut.blocks[n]["type"] == k)
             for k in ("ResnetBlock2D", "Transformer2DModel")}
    return {"base": base, "keep_attention": keep, "label": f"searched ({base}, keep {keep})",
            "target_ms": target, "predicted_ms": result.predicted_ms, "removed": result.removed,
            "removed_by_type": kinds, "blocks": len(lut.blocks), "table_total_ms": lut.total_ms,
            "rounds": len(result.rounds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-ratio", type=float, default=0.2, help="of SD-v1.5's step in its own table")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per block and per model")
    ap.add_argument("--actions-per-round", type=int, default=4)
    ap.add_argument("--search", action="append", default=None, metavar="BASE:KEEP",
                    help="a search to run: base UNet preset and transformers kept (default: sd15-unet:0, "
                         "mobile-sd:4)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "search_sd.json"))
    args = ap.parse_args()
    from pocketdiff.models import presets
    from pocketdiff.threads import apply_threads

    threads, why = apply_threads(args.threads)
    torch.manual_seed(0)
    unets = {name: presets.build(name)[1].eval() for name in ("sd15-unet", "bk-sdm-tiny", "mobile-sd")}
    sd_ms = table(unets["sd15-unet"], RESULTS / "search_sd_lut_sd15-unet.json", args.runs, threads).total_ms
    searches = [search(b, unets[b], sd_ms, args, threads, int(k)) for b, k in
                (x.split(":") for x in (args.search or ["sd15-unet:0", "mobile-sd:4"]))]
    models = {"sd15-unet": (unets["sd15-unet"], []), "bk-sdm-tiny": (unets["bk-sdm-tiny"], []),
              "mobile-sd": (unets["mobile-sd"], [])}
    models.update({r["label"]: (unets[r["base"]], r["removed"]) for r in searches})
    rows = measure_rows(models, args.runs)
    for r in rows:
        print(f"{r['model']:32s} {r['params_m']:8.1f} M {r['gmacs']:8.1f} GMACs {r['median_ms']:9.0f} ms "
              f"{r['vs_sd15']:.2f}x")
    report = {"threads": threads, "threads_why": why, "target_ratio": args.target_ratio, "sd15_table_ms": sd_ms,
              "searches": searches, "rows": rows,
              "command": "python benchmarks/search_sd.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
