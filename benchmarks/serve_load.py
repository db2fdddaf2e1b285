"""`pocketdiff serve` under load: micro-batching on against off, and an overload that must answer 429.

    python benchmarks/serve_load.py [--model shapes-lcm] [--requests 500] [--concurrency 8] [--rounds 2]

A live server (uvicorn in this process, the model loaded once per setting) on a free loopback port; clients are
threads with their own httpx connection, each sending one-image requests with distinct seeds back to back.
The settings are interleaved: each round runs requests/rounds requests per setting, so drift hits both alike.
Then an overload: a small queue (--overload-queue) and many more clients than it holds, without retries: the
answers must be 200s and 429s only, and the process's peak RSS (VmHWM) is read before and after.
Writes docs/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PROMPTS = ["a large blue heart in the center on a white background", "a small red star at the top left on a blue "
           "background", "a green circle at the bottom on a black background"]
SETTINGS = {"batching on": dict(max_batch=8, max_wait_ms=20.0), "batching off": dict(max_batch=1, max_wait_ms=0.0)}


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def fire(url: str, n: int, concurrency: int, seed0: int) -> tuple[list[float], list[int], float]:
    """``n`` requests from ``concurrency`` clients: latencies (s), status codes, wall seconds."""
    lat, codes, lock = [], [], threading.Lock()
    counter = iter(range(n))

    def client(_):
        with httpx.Client(timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/images/generations", json={"prompt": PROMPTS[i % 3], "seed": seed0 + i})
                with lock:
                    lat.append(time.perf_counter() - t0)
                    codes.append(r.status_code)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(client, range(concurrency)))
    return lat, codes, time.perf_counter() - t0


def batch_sizes(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    vals = {k: float(v) for k, v in (line.split() for line in text.splitlines()
                                     if line.startswith("pocketdiff_batch_images_") and " " in line
                                     and not line.startswith("#") and "{" not in line)}
    return vals.get("pocketdiff_batch_images_sum", 0) / max(vals.get("pocketdiff_batch_images_count", 0), 1)


def run_load(pipe, name: str, args) -> list[dict]:
    from pocketdiff.serve.app import ServeConfig, create_app
    from pocketdiff.serve.engine import Engine
    from pocketdiff.testing import LiveServer

    acc = {s: {"lat": [], "codes": [], "wall": 0.0, "mean_batch": []} for s in SETTINGS}
    per_round = args.requests // args.rounds
    for r in range(args.rounds):
        for setting, cfg in SETTINGS.items():
            with LiveServer(create_app(Engine(pipe, name), ServeConfig(max_queue=64, **cfg))) as live:
                fire(live.url, args.concurrency, args.concurrency, 10**6)  # warm-up, not counted
                lat, codes, wall = fire(live.url, per_round, args.concurrency, r * per_round)
                acc[setting]["mean_batch"].append(batch_sizes(live.url))
            acc[setting]["lat"] += lat
            acc[setting]["codes"] += codes
            acc[setting]["wall"] += wall
            print(f"round {r + 1} {setting}: {per_round / wall:.1f} images/s", flush=True)
    rows = []
    for setting, a in acc.items():
        q = statistics.quantiles(a["lat"], n=20)
        rows.append({"setting": setting, "requests": len(a["codes"]), "failures": sum(c != 200 for c in a["codes"]),
                     "images_per_s": len(a["codes"]) / a["wall"], "p50_s": statistics.median(a["lat"]),
                     "p95_s": q[18], "mean_batch": statistics.mean(a["mean_batch"])})
    return rows


def run_overload(pipe, name: str, args) -> dict:
    from pocketdiff.serve.app import ServeConfig, create_app
    from pocketdiff.serve.engine import Engine
    from pocketdiff.testing import LiveServer

    before = vm_hwm_kb()
    cfg = ServeConfig(max_queue=args.overload_queue, max_batch=8, max_wait_ms=20.0)
    with LiveServer(create_app(Engine(pipe, name), cfg)) as live:
        _, codes, wall = fire(live.url, args.overload_requests, args.overload_clients, 0)
        alive = httpx.get(f"{live.url}/health").json()["status"] == "ok"
    counts = {str(c): codes.count(c) for c in sorted(set(codes))}
    return {"requests": len(codes), "clients": args.overload_clients, "queue": args.overload_queue,
            "status_counts": counts, "wall_s": wall, "alive_after": alive,
            "vm_hwm_mb_before": before / 1024, "vm_hwm_mb_after": vm_hwm_kb() / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-lcm")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--overload-requests", type=int, default=300)
    ap.add_argument("--overload-clients", type=int, default=48)
    ap.add_argument("--overload-queue", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="serve_load.json")
    args = ap.parse_args()
    from pocketdiff.models.registry import resolve_model
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.threads import apply_threads

    threads, why = apply_threads(args.threads)
    pipe = Pipeline.from_folder(resolve_model(args.model))
    rows = run_load(pipe, args.model, args)
    overload = run_overload(pipe, args.model, args)
    result = {"model": args.model, "threads": threads, "threads_why": why, "concurrency": args.concurrency,
              "steps": pipe.settings().steps, "sampler": pipe.settings().sampler, "rounds": args.rounds,
              "rows": rows, "overload": overload}
    print(json.dumps(result, indent=2))
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
