"""The bad-input table: every case of ``pocketdiff.testing.BAD_GENERATE_INPUTS`` run through ``pocketdiff generate``
on the shipped tiny-random model, with its exit code, what it printed and whether it left any file behind.

    python benchmarks/bad_inputs.py        # writes docs/results/bad_inputs.json

tests/test_cli.py asserts the same cases end in one line and exit 2; this records the messages users see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.testing import BAD_GENERATE_INPUTS  # noqa: E402

PROMPT = "a small red star at the top left on a blue background"


def run_case(args: list | None, tmp: Path) -> dict:
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    extra = [str(a).format(tmp=tmp) for a in (args or [])]
    argv = ["generate", "--model", "tiny-random", "--steps", "2", "--no-progress",
            *([] if args is None else [PROMPT]), "-o", str(out), *extra]
    before = sorted(p.name for p in tmp.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "pocketdiff", *argv], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "POCKETDIFF_THREADS": "1"})
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    message = (err[-1] if err else "").replace(str(tmp), "{tmp}")
    return {"argv": [a.replace(str(tmp), "{tmp}") for a in argv[1:]], "exit": proc.returncode, "lines": len(err),
            "message": message,
            "traceback": "Traceback" in proc.stderr, "wrote": sorted(p.name for p in tmp.rglob("*")) != before}


def main() -> int:
    rows = []
    for name, args in BAD_GENERATE_INPUTS.items():
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            (tmp / "empty.txt").write_text("\n \n")
            (tmp / "folder.png").mkdir()
            rows.append({"case": name, **run_case(args, tmp)})
        r = rows[-1]
        print(f"{name}: exit {r['exit']}, {r['lines']} line(s): {r['message'][:100]}", file=sys.stderr)
    (ROOT / "docs" / "results" / "bad_inputs.json").write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
