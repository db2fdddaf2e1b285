"""The default thread count against 1 and 2 threads, on an idle CPU and with another process busy on one core.

    python benchmarks/threads.py [--model default] [--steps 25] [--runs 3]

Each run is a fresh ``pocketdiff generate`` process (its own timing line gives the generation's total and the
slowest UNet step, model loading excluded); settings are interleaved within each round so drift hits them alike.
The load is a Python busy loop in another process. Writes docs/results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PROMPT = "a large blue heart in the center on a white background"
TIMING = re.compile(r"total (?P<total>[\d.]+) s .*\| (?P<threads>\d+) thread\(s\)")
SLOWEST = re.compile(r"\(slowest (?P<slow>[\d.]+)\)")


def one_run(model: str, steps: int, threads: int | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pocketdiff", "generate", PROMPT, "--model", model, "--steps", str(steps),
           "--no-progress", "--overwrite", "-o", str(out)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin",
                                                                                "POCKETDIFF_JEMALLOC": "0"})
    line = next(x for x in proc.stdout.splitlines() if x.startswith("timing:"))
    m, s = TIMING.search(line), SLOWEST.search(line)
    return {"total_s": float(m["total"]), "threads": int(m["threads"]), "slowest_step_ms": float(s["slow"])}


def measure(model: str, steps: int, runs: int, loaded: bool) -> list[dict]:
    settings = {"default": None, "1 thread": 1, "2 threads": 2}
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        if load is not None:
            time.sleep(2.0)  # let the busy loop take its core
        samples: dict[str, list[dict]] = {k: [] for k in settings}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(runs):
                for name, n in settings.items():
                    samples[name].append(one_run(model, steps, n, Path(tmp) / "x.png"))
    finally:
        if load is not None:
            load.kill()
    return [{"condition": "loaded (1 core busy)" if loaded else "idle", "setting": name,
             "threads": [r["threads"] for r in rows], "median_total_s": statistics.median(r["total_s"] for r in rows),
             "max_total_s": max(r["total_s"] for r in rows),
             "median_slowest_step_ms": statistics.median(r["slowest_step_ms"] for r in rows)}
            for name, rows in samples.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    rows = measure(args.model, args.steps, args.runs, loaded=False) + measure(args.model, args.steps, args.runs,
                                                                              loaded=True)
    print("| condition | setting | threads used | median s/image | max s/image | median slowest step ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['condition']} | {r['setting']} | {'/'.join(map(str, r['threads']))} | {r['median_total_s']:.2f} |"
              f" {r['max_total_s']:.2f} | {r['median_slowest_step_ms']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps({"model": args.model, "steps": args.steps, "runs": args.runs,
                                                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
