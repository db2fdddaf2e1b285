"""Does the search's cheap proxy rank actions as the checker does? A rank correlation on the default model.

    python benchmarks/search_proxy.py --model shapes-teacher --model runs/teacher-robust/model [--actions 16]

For each model, a fixed sample of actions (removal sets drawn from its ResNet and transformer blocks: single blocks
and pairs, seeded, the same for every model) is scored twice: by the proxy `pocketdiff search` uses (the
object-weighted denoising loss on 128 fixed noised validation latents; seconds per action) and by the checker's
all-correct on ``--n`` fresh prompts at ``--steps`` DDIM steps with CFG (minutes per action). Reported: Spearman's
rho between the proxy's increase and the all-correct drop (1 = the same ranking), and each action's numbers.
A robustly trained model (``train ... --skip-prob``) should both lose less per removal and rank more faithfully.
Writes docs/results/search_proxy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sample_actions(names: list[str], k: int, seed: int = 0) -> list[list[str]]:
    """``k`` removal sets: half single blocks, half pairs, drawn without repeats."""
    rng = np.random.default_rng(seed)
    singles = [[names[i]] for i in rng.permutation(len(names))[: k // 2]]
    pairs = []
    while len(pairs) < k - len(singles):
        a, b = sorted(rng.choice(len(names), 2, replace=False))
        if [names[a], names[b]] not in pairs:
            pairs.append([names[a], names[b]])
    return singles + pairs


def measure_model(folder: Path, actions: list[list[str]], args) -> dict:
    from scipy.stats import spearmanr

    from pocketdiff.eval.quality import evaluate
    from pocketdiff.blocks.skipping import removed
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.search.proxy import proxy_loss, validation_set

    pipe = Pipeline.from_folder(folder, runner="eager")
    vset = validation_set(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.schedule, n=128, foreground_weight=4.0)

    def both(cut: list[str]) -> dict:
        with removed(pipe.unet, cut):
            p = proxy_loss(pipe.unet, vset)
            r = evaluate(pipe, n=args.n, steps=args.steps, sampler="ddim", guidance=args.guidance, seed=11,
                         batch_size=32, progress=False)
        return {"removed": cut, "proxy": p, "all_correct": r["all_correct"]}

    full = both([])
    rows = []
    for cut in actions:
        rows.append(both(cut))
        print(f"{folder.name}: -{cut}: proxy {rows[-1]['proxy']:.4f}, all-correct {rows[-1]['all_correct']:.3f}",
              flush=True)
    rho = spearmanr([r["proxy"] - full["proxy"] for r in rows], [full["all_correct"] - r["all_correct"] for r in rows])
    return {"model": str(folder), "full": full, "actions": rows, "spearman_rho": float(rho.statistic),
            "p_value": float(rho.pvalue),
            "mean_all_correct_drop": float(np.mean([full["all_correct"] - r["all_correct"] for r in rows]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="model folder or shipped name (repeatable)")
    ap.add_argument("--actions", type=int, default=16)
    ap.add_argument("--n", type=int, default=64, help="prompts per all-correct measurement")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "search_proxy.json"))
    args = ap.parse_args()
    from pocketdiff.folder import load_components
    from pocketdiff.models.registry import resolve_model
    from pocketdiff.blocks.skipping import skippable_blocks
    from pocketdiff.threads import apply_threads

    threads, why = apply_threads(args.threads)
    folders = [resolve_model(m) for m in args.model]
    names = list(skippable_blocks(load_components(folders[0])["unet"]))
    actions = sample_actions(names, args.actions)
    results = [measure_model(Path(f), actions, args) for f in folders]
    for r in results:
        print(f"{r['model']}: Spearman rho {r['spearman_rho']:.2f} (p {r['p_value']:.3f}), full all-correct "
              f"{r['full']['all_correct']:.3f}, mean drop {r['mean_all_correct_drop']:.3f}")
    report = {"threads": threads, "threads_why": why, "n": args.n, "steps": args.steps, "guidance": args.guidance,
              "models": results, "command": "python benchmarks/search_proxy.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
