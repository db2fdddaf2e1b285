"""Generation quality on the Shapes domain: sample fresh prompts, check every image, summarise.

``evaluate(pipe, ...)`` is what ``pocketdiff eval`` runs and what the results benchmarks call. The
analytic checker gives all-correct and per-attribute accuracy, split by object count and by seen /
held-out colour-shape pairs; time is wall-clock seconds per image for the whole pipeline.
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm import tqdm

from ..data.shapes import IMAGE_SIZE, caption, sample_scene
from .checker import aggregate, check


def fresh_prompts(n: int, seed: int = 0, split: str = "all", n_objects: int | None = None) -> list[str]:
    """``n`` captions of fresh scenes (``split="all"`` includes held-out pairs at their natural rate)."""
    rng = np.random.default_rng([seed, 31337])
    return [caption(sample_scene(rng, n_objects=n_objects, split=split)) for _ in range(n)]


def clip_metrics(clip, images: np.ndarray, prompts: list[str], seed: int) -> dict:
    """Domain-CLIP score (mean cosine of image and prompt) and Frechet distance in its image-feature space
    between the generated images and real renders of fresh scenes (the FID stand-in)."""
    from ..data.shapes import sample_batch
    from .frechet import frechet_distance_features

    real, _, _ = sample_batch(np.random.default_rng([seed, 4711]), len(images), split="all")
    return {"clip_score": float(clip.score(images, prompts).mean()),
            "fd": frechet_distance_features(clip.image_features(images), clip.image_features(real))}


def evaluate(pipe, *, n: int = 500, steps: int = 25, sampler: str = "dpmpp_2m", guidance: float = 4.0,
             seed: int = 0, batch_size: int = 25, progress: bool = True, clip=None) -> dict:
    """Generate ``n`` images for fresh prompts and score them with the checker (and ``clip``, a DomainCLIP)."""
    prompts = fresh_prompts(n, seed)
    pipe.runner.plan_calls(steps * math.ceil(n / batch_size))
    results, seconds, images = [], 0.0, []
    bar = tqdm(total=n, desc=f"eval {sampler} {steps} steps g={guidance}", unit="image", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]")
    for i in range(0, n, batch_size):
        chunk = prompts[i:i + batch_size]
        t0 = time.perf_counter()
        out = pipe(chunk, steps=steps, sampler=sampler, guidance=guidance, seed=seed + i, height=IMAGE_SIZE,
                   width=IMAGE_SIZE, callback=lambda _info, k=len(chunk): bar.update(k / steps))  # moves every step
        seconds += time.perf_counter() - t0
        arrays = [np.asarray(im) for im in out.images]
        images += arrays
        results += [check(a, p) for a, p in zip(arrays, chunk)]
    bar.close()
    summary = aggregate(results)
    extra = clip_metrics(clip, np.stack(images), prompts, seed) if clip is not None else {"clip_score": None, "fd": None}
    return {"n": n, "steps": steps, "sampler": sampler, "guidance": guidance, "seed": seed,
            "seconds_per_image": seconds / n, "batch_size": batch_size, **extra, **summary,
            "per_prompt": [bool(r["all_correct"]) for r in results]}  # for paired tests between models


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """The exact McNemar test of two models' all-correct on the same prompts and seeds: the discordant counts
    (a right where b is wrong, and the reverse) and the two-sided binomial p-value of their split."""
    import math

    if len(a) != len(b):
        raise ValueError(f"paired results need the same prompts: {len(a)} vs {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def markdown_row(name: str, r: dict) -> str:
    bc = {int(k): v for k, v in r["by_count"].items()}  # JSON round trips make the counts strings
    return (f"| {name} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {100 * r['all_correct']:.1f} | "
            f"{100 * bc[1]['all_correct']:.1f} | {100 * r['by_split']['seen']['all_correct']:.1f} | "
            f"{100 * r['by_split']['heldout']['all_correct']:.1f} | {100 * r['colour']:.1f} | {100 * r['shape']:.1f} | "
            f"{100 * r['size']:.1f} | {100 * r['present']:.1f} | {_num(r.get('clip_score'), 3)} | {_num(r.get('fd'), 2)} | "
            f"{r['seconds_per_image']:.3f} |")


def card_quality(r: dict) -> dict:
    """The headline numbers of an :func:`evaluate` result, as a model card's ``quality`` entry."""
    bc = {int(k): v for k, v in r["by_count"].items()}  # JSON round trips make the counts strings
    return {**{k: r.get(k) for k in ("n", "steps", "sampler", "guidance", "all_correct", "seconds_per_image",
                                      "clip_score", "fd")},
            "single_object_all_correct": bc[1]["all_correct"],
            "heldout_all_correct": r["by_split"]["heldout"]["all_correct"]}


def _num(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


MARKDOWN_HEADER = ("| model | sampler | steps | guidance | all-correct % | 1-object % | seen % | held-out % | colour % | "
                   "shape % | size % | present % | CLIP score | FD | s/image |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def drawn_instead(r: dict, shape: str) -> str | None:
    """The shape drawn most often when an :func:`evaluate` result ``r`` asked for ``shape`` (None: never wrong)."""
    wrong = {k: v for k, v in r["by_shape"][shape]["predicted"].items() if k != shape and v}
    return max(wrong, key=wrong.get) if wrong else None


def shape_markdown(named: list[tuple[str, dict]]) -> str:
    """A table of shape accuracy per expected shape, one row per ``(name, evaluate result)``; each cell is
    the share drawn as the right shape and, in brackets, the shape drawn most often instead."""
    shapes = list(named[0][1]["by_shape"])
    lines = ["| model | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for name, r in named:
        cells = []
        for s in shapes:
            if not r["by_shape"][s]["n"]:
                cells.append("n/a")
                continue
            instead = drawn_instead(r, s)
            cells.append(f"{100 * r['by_shape'][s]['shape']:.0f}" + (f" ({instead})" if instead else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
