"""Compare Shapes models in one run: quality (checker, CLIP score, FD), UNet cost and pipeline latency.

Each ``--run`` is ``LABEL=MODEL:SAMPLER:STEPS:GUIDANCE``. All runs are scored on the same fresh
prompts and seeds. UNet params, MACs and per-step latency are measured for every model in one
interleaved loop (A B C A B C ...), so their ratios to the first run's model are same-run ratios.

    python benchmarks/shapes_compare.py --name kd \\
        --run teacher=shapes-teacher:dpmpp_2m:25:4 --run bk-tiny=runs/kd/model:dpmpp_2m:25:4 [--n 500]

writes docs/results/shapes_<name>.json (and prints markdown).
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
RESULTS = ROOT / "docs" / "results"
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.bench.measure import component_call, count_macs, count_params  # noqa: E402
from pocketdiff.eval.quality import evaluate, markdown_row, shape_markdown  # noqa: E402


def parse_run(text: str) -> dict:
    try:
        label, rest = text.split("=", 1)
        model, sampler, steps, guidance = rest.rsplit(":", 3)
        if not Path(model).is_dir():  # a folder whose name holds a '+' is a model, not MODEL+VAE
            model, _, vae = model.partition("+")
        else:
            vae = ""
        return {"label": label, "model": model, "vae": vae or None, "sampler": sampler, "steps": int(steps),
                "guidance": float(guidance)}
    except ValueError:
        raise SystemExit(f"--run {text!r}: expected LABEL=MODEL[+VAE_FOLDER]:SAMPLER:STEPS:GUIDANCE") from None


@torch.no_grad()
def unet_costs(pipes: dict, runs: int) -> dict:
    """{label: {params, gmacs, unet_ms}} with each UNet called as the pipeline calls it (CFG batch or not)."""
    calls, out = {}, {}
    for label, (pipe, run) in pipes.items():
        cfg = run["guidance"] != 1.0 and not getattr(pipe.unet.config, "time_cond_proj_dim", None)
        fn, inputs = component_call("unet", pipe.unet, resolution=pipe.default_size, cfg=cfg,
                                    latent_factor=pipe.vae_scale_factor, seq_len=pipe.tokenizer.model_max_length)
        calls[label] = (fn, inputs)
        out[label] = {"params": count_params(pipe.unet), "gmacs": count_macs(fn, *inputs) / 1e9, "cfg": cfg, "t": []}
        for _ in range(3):
            fn(*inputs)
    for _ in range(runs):
        for label, (fn, inputs) in calls.items():
            t0 = time.perf_counter()
            fn(*inputs)
            out[label]["t"].append(time.perf_counter() - t0)
    for o in out.values():
        o["unet_ms"] = 1e3 * statistics.median(o.pop("t"))
    return out


def disk_mb(folder: Path, vae: str | None = None) -> dict:
    """Safetensors bytes on disk (MiB): the UNet's and the whole folder's (a quantized UNet counts as stored;
    with ``vae``, that VAE folder counts instead of the model's own)."""
    size = lambda root: sum(f.stat().st_size for f in Path(root).rglob("*.safetensors")) / 2**20  # noqa: E731
    total = size(folder) - (size(Path(folder) / "vae") - size(vae) if vae else 0.0)
    return {"unet_mb": size(Path(folder) / "unet"), "model_mb": total}


def markdown(rows: list[dict]) -> str:
    from pocketdiff.eval.quality import MARKDOWN_HEADER

    cost = ["| run | training steps | UNet params M | UNet MB on disk | model MB on disk | UNet GMACs/step | "
            "UNet ms/step | UNet step vs first | s/image vs first |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost.append(f"| {r['label']} | {r.get('steps_trained') or ''} | {r['params'] / 1e6:.2f} | {r['unet_mb']:.2f} | "
                    f"{r['model_mb']:.2f} | "
                    f"{r['gmacs']:.3f} | {r['unet_ms']:.2f} | "
                    f"{r['unet_ratio']:.2f}x | {r['time_ratio']:.3f}x |")
    quality = [MARKDOWN_HEADER] + [markdown_row(r["label"], r["quality"]) for r in rows]
    out = "\n".join(cost) + "\n\n" + "\n".join(quality)
    paired = [r for r in rows if "paired" in r and r["label"] != r["paired"]["against"]]
    if paired:
        out += ("\n\nPaired exact McNemar tests of all-correct on the same prompts and seeds: prompts only the row "
                "gets right, only the reference gets right, two-sided p.\n\n| run | against | only run | only "
                "against | p |\n|---|---|---|---|---|\n" + "\n".join(
                    f"| {r['label']} | {r['paired']['against']} | {r['paired']['only_a']} | {r['paired']['only_b']} "
                    f"| {r['paired']['p_value']:.3g} |" for r in paired))
    shaped = [(r["label"], r["quality"]) for r in rows if "by_shape" in r["quality"]]
    if shaped:  # results written before the checker reported it have no per-shape split
        out += ("\n\nShape accuracy (%) by the shape the prompt asked for; in brackets, the shape drawn most often "
                "instead.\n\n" + shape_markdown(shaped))
    return out


def write_card(folder: Path, rows: list[dict], label: str, command: str) -> None:
    """Store run ``label``'s measurements in its model folder: pocketdiff.json (quality, cost vs the first run,
    which is the reference) and README.md (every run of that folder in this comparison)."""
    from pocketdiff.eval.quality import MARKDOWN_HEADER, card_quality, markdown_row

    row = next(r for r in rows if r["label"] == label)
    q = row["quality"]
    card_file = folder / "pocketdiff.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    card.setdefault("defaults", {}).update({"steps": q["steps"], "sampler": q["sampler"], "guidance": q["guidance"]})
    card["quality"] = card_quality(q)
    card["model"] = {"unet_params": row["params"], "unet_gmacs": row["gmacs"], "unet_ms": row["unet_ms"],
                     "unet_mb": row["unet_mb"], "size_mb": row["model_mb"], "reference": rows[0]["label"],
                     "unet_step_vs_teacher": row["unet_ratio"], "seconds_per_image_vs_teacher": row["time_ratio"]}
    card_file.write_text(json.dumps(card, indent=2, default=float))
    same = [r for r in rows[1:] if Path(r["folder"]) == Path(row["folder"])]  # rows[0], the reference, comes first
    table = "\n".join(markdown_row(r["label"], r["quality"]) for r in [rows[0]] + same)
    (folder / "README.md").write_text(
        f"# {folder.name}\n\n{card.get('description', '')}\n\nMeasured by `{command}` on fresh prompts "
        f"(first row: the reference, {rows[0]['label']}; its UNet step is {row['unet_ratio']:.2f}x the "
        f"reference's):\n\n{MARKDOWN_HEADER}\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="results file: docs/results/shapes_<name>.json")
    ap.add_argument("--run", action="append", required=True, type=parse_run)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost-runs", type=int, default=30)
    ap.add_argument("--clip", default=None, help="domain-CLIP folder (default: the shipped shapes-clip, if any)")
    ap.add_argument("--paired", metavar="LABEL", help="an exact McNemar test of every run's all-correct against "
                                                        "this run's, prompt by prompt (same prompts and seeds)")
    ap.add_argument("--pair", action="append", default=[], metavar="ROW=REF",
                    help="the same test of run ROW against run REF only (overrides --paired for ROW; repeatable)")
    ap.add_argument("--card", action="append", default=[], metavar="LABEL",
                    help="write this run's measurements into its model folder's card (pocketdiff.json, README.md)")
    args = ap.parse_args()
    labels = [r["label"] for r in args.run]
    refs = {label: args.paired for label in labels} if args.paired else {}
    for pair in args.pair:
        row, _, ref = pair.partition("=")
        refs[row] = ref
    bad = sorted({x for x in (*refs, *refs.values()) if x not in labels})
    if bad:
        raise SystemExit(f"--paired / --pair {', '.join(bad)}: no --run has that label")
    unknown = set(args.card) - {r["label"] for r in args.run}
    if unknown:
        raise SystemExit(f"--card {', '.join(sorted(unknown))}: no --run has that label")
    swapped = [r["label"] for r in args.run if r["label"] in args.card and r["vae"]]
    if swapped:
        raise SystemExit(f"--card {', '.join(swapped)}: decoded with another VAE than its folder's; ship the folder "
                         "with that VAE first (python -m pocketdiff.models.ship ... --vae)")
    from pocketdiff.eval.clip import load_domain_clip
    from pocketdiff.models.registry import model_card, resolve_model
    from pocketdiff.pipeline import Pipeline

    clip = load_domain_clip(args.clip)
    pipes = {r["label"]: (Pipeline.from_folder(resolve_model(r["model"]), vae=r["vae"]), r) for r in args.run}
    costs = unet_costs(pipes, args.cost_runs)
    rows = []
    for label, (pipe, run) in pipes.items():
        q = evaluate(pipe, n=args.n, steps=run["steps"], sampler=run["sampler"], guidance=run["guidance"],
                     seed=args.seed, clip=clip)
        rows.append({**run, "folder": str(pipe.source), "steps_trained": model_card(pipe.source).get("steps_trained"),
                     **costs[label], **disk_mb(pipe.source, run["vae"]), "quality": q})
        print(markdown_row(label, q), file=sys.stderr, flush=True)
    if refs:
        from pocketdiff.eval.quality import mcnemar

        by_label = {r["label"]: r for r in rows}
        for label, against in refs.items():
            r, ref = by_label[label], by_label[against]
            r["paired"] = {"against": against, **mcnemar(r["quality"]["per_prompt"], ref["quality"]["per_prompt"])}
            print(f"{label} vs {against}: McNemar p = {r['paired']['p_value']:.3g}", file=sys.stderr)
    for r in rows:
        r["unet_ratio"] = r["unet_ms"] / rows[0]["unet_ms"]
        r["time_ratio"] = r["quality"]["seconds_per_image"] / rows[0]["quality"]["seconds_per_image"]
    print(markdown(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"shapes_{args.name}.json"
    command = "python benchmarks/shapes_compare.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps({"meta": {"n": args.n, "seed": args.seed, "threads": torch.get_num_threads(),
                                         "command": command},
                                "rows": rows}, indent=2, default=float))
    print(f"wrote {path}")
    for label in args.card:
        write_card(Path(next(r["folder"] for r in rows if r["label"] == label)), rows, label, command)


if __name__ == "__main__":
    main()
