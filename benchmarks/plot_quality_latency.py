"""Quality vs latency across the measured Shapes models: docs/quality_vs_latency.png.

Reads the ``docs/results/shapes_<name>.json`` that ``shapes_compare.py`` wrote for the compression path
(``PLOTTED``: the teacher at several step counts, the KD student, the LCM student, the 2-step students with
a pruned decoder; the quantization and ablation comparisons repeat those models and are left out). One point per run:
seconds per image (log scale, x) against all-correct (y), labelled by run. Needs matplotlib
(``pip install '.[bench]'``).

    python benchmarks/plot_quality_latency.py [--out docs/quality_vs_latency.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PLOTTED = ("kd", "lcm", "two-step-fast")  # comparisons drawn, in this order


def points() -> list[dict]:
    """(label, seconds per image, all-correct) for every run of every comparison, deduplicated by label."""
    seen: dict[str, dict] = {}
    for path in (RESULTS / f"shapes_{name}.json" for name in PLOTTED):
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            q = r["quality"]
            label = f"{r['label']} ({q['steps']} steps)"
            seen.setdefault(label, {"label": label, "seconds": q["seconds_per_image"],
                                    "all_correct": q["all_correct"], "source": path.name})
    return list(seen.values())


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        ax.scatter(r["seconds"], 100 * r["all_correct"], s=30)
        ax.annotate(r["label"], (r["seconds"], 100 * r["all_correct"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image on this CPU (log scale)")
    ax.set_ylabel("all-correct % (Shapes checker)")
    ax.set_title("pocketdiff Shapes models: quality vs latency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "quality_vs_latency.png")
    args = ap.parse_args()
    rows = points()
    if not rows:
        print("no comparison results yet: run benchmarks/shapes_compare.py first", file=sys.stderr)
        return 1
    plot(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
