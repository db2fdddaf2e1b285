"""Compact UNet presets at SD scale: params, MACs and per-step latency vs SD-v1.5, in one run.

Every preset is built from SD-v1.5's UNet config (random weights) and timed at 512 px, batch 1, one
UNet call (no CFG). Calls are interleaved across presets (A B C ... A B C ...) so machine noise hits
all of them alike; the table gives medians and same-run ratios to SD-v1.5, and the ratio of the
latency ratio to the MAC ratio (1.0: latency tracks compute). A per-block latency table (the
latency lookup table of SnapFusion's architecture evolution) is written for SD-v1.5 and BK-SDM-Tiny.

    python benchmarks/compact_presets.py [--runs 5] [--resolution 512] [--json docs/results/compact_presets.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.bench.blocks import by_type_and_resolution, per_block_latency  # noqa: E402
from pocketdiff.bench.measure import component_call, count_macs, count_params  # noqa: E402
from pocketdiff.models import presets  # noqa: E402

PRESETS = ("sd15-unet", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "mobile-sd")
BLOCK_TABLES = ("sd15-unet", "bk-sdm-tiny", "mobile-sd")


@torch.no_grad()
def measure(resolution: int, runs: int, warmup: int) -> list[dict]:
    calls, rows = {}, {}
    for name in PRESETS:
        torch.manual_seed(0)
        _, unet = presets.build(name)
        unet.eval()
        fn, inputs = component_call("unet", unet, resolution=resolution, batch=1, cfg=False)
        calls[name] = (fn, inputs)
        rows[name] = {"preset": name, "params": count_params(unet), "macs": count_macs(fn, *inputs), "times": []}
        for _ in range(warmup):
            fn(*inputs)
        print(f"built {name}: {rows[name]['params'] / 1e6:.1f} M params, {rows[name]['macs'] / 1e9:.1f} GMACs",
              flush=True)
    for r in range(runs):
        for name, (fn, inputs) in calls.items():
            t0 = time.perf_counter()
            fn(*inputs)
            rows[name]["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{runs}: " + ", ".join(f"{n} {rows[n]['times'][-1]:.2f}s" for n in calls), flush=True)
    base = rows[PRESETS[0]]
    base_s = statistics.median(base["times"])
    out = []
    for name in PRESETS:
        row = rows[name]
        s = statistics.median(row["times"])
        lat_ratio, mac_ratio = s / base_s, row["macs"] / base["macs"]
        out.append({"preset": name, "params": row["params"], "gmacs": row["macs"] / 1e9, "median_s": s,
                    "min_s": min(row["times"]), "max_s": max(row["times"]), "latency_ratio": lat_ratio,
                    "mac_ratio": mac_ratio, "latency_per_mac_ratio": lat_ratio / mac_ratio,
                    "speedup": 1 / lat_ratio})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | params M | GMACs/step | median s/step | latency vs SD-1.5 | MACs vs SD-1.5 | "
             "latency ratio / MAC ratio | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f} | {r['gmacs']:.1f} | {r['median_s']:.2f} | "
                     f"{r['latency_ratio']:.2f} | {r['mac_ratio']:.2f} | {r['latency_per_mac_ratio']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def block_summary_markdown(summary: list[dict]) -> str:
    lines = ["| block type | resolution | blocks | GMACs | ms | % of step | GMAC/s |", "|---|---|---|---|---|---|---|"]
    total = sum(a["median_ms"] for a in summary) or 1.0
    for a in summary:
        lines.append(f"| {a['type']} | {a['resolution'] or ''} | {a['blocks']} | {a['macs'] / 1e9:.1f} | "
                     f"{a['median_ms']:.0f} | {100 * a['median_ms'] / total:.1f} | {a['gmacs_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--block-runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = measure(args.resolution, args.runs, args.warmup)
    print(markdown(rows))
    blocks = {}
    for name in BLOCK_TABLES:
        torch.manual_seed(0)
        _, unet = presets.build(name)
        table = per_block_latency(unet.eval(), resolution=args.resolution, batch=1, cfg=False, runs=args.block_runs)
        blocks[name] = {"rows": table, "summary": by_type_and_resolution(table)}
        print(f"\n{name} per block type and resolution:\n" + block_summary_markdown(blocks[name]["summary"]))
    if args.json:
        meta = {"resolution": args.resolution, "batch": 1, "cfg": False, "runs": args.runs,
                "threads": torch.get_num_threads(), "torch": torch.__version__}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "blocks": blocks}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
