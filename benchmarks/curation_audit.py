"""What each curation step does to each fault of a dirty Shapes set, scored against the set's truth.

For each curated folder (``pocketdiff data curate`` of the same dirty set), per fault: the share of its pairs the
curation dropped, and the share kept with the scene's clean caption (an off-centre crop's clean caption is its
uncropped scene's, so a captioner describing the crop differs from it by design). Reads only the folders' reports.

    python benchmarks/curation_audit.py --dirty runs/data28/dirty --step dedup=runs/data28/dedup ... \
        [--json docs/results/curation_audit.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.data.dirty import audit  # noqa: E402


def markdown(steps: dict[str, dict]) -> str:
    labels = list(steps)
    faults = list(next(iter(steps.values())))
    lines = ["| fault | pairs | " + " | ".join(f"{s}: dropped / kept with clean caption %" for s in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for fault in faults:
        n = steps[labels[0]][fault]["n"]
        cells = [f"{100 * r[fault]['dropped'] / n:.1f} / {100 * r[fault]['clean_caption'] / n:.1f}"
                 for r in steps.values()]
        lines.append(f"| {fault} | {n} | " + " | ".join(cells) + " |")
    kept = [sum(r[f]["n"] - r[f]["dropped"] for f in faults) for r in steps.values()]
    lines.append("| **pairs kept** | " + str(sum(steps[labels[0]][f]["n"] for f in faults)) + " | "
                 + " | ".join(str(k) for k in kept) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dirty", type=Path, required=True, help="the dirty set (with its dirty.json)")
    ap.add_argument("--step", action="append", required=True, help="LABEL=FOLDER of a curation of it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    steps = {}
    for spec in args.step:
        label, _, folder = spec.partition("=")
        report = json.loads((Path(folder) / "report.json").read_text())
        steps[label] = {"config": report["config"], "faults": audit(args.dirty, report)}
    print(markdown({k: v["faults"] for k, v in steps.items()}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dirty": str(args.dirty), "steps": steps}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
