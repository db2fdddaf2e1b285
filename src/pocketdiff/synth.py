"""Teacher-generated training pairs (EdgeFusion's synthetic set): ``pocketdiff data synth --teacher DIR --prompts
FILE OUT``.

Prompt i is generated with seed ``seed + i`` in batches; each batch's PNGs and its ``batch-NNNNNN.jsonl`` (one line
per image: file name, prompt, the prompts file and the prompt's index in it, seed, the generation settings) are written into
``OUT.partial/`` and the batch file last, atomically, so an interrupted run resumes at its first missing batch.
At the end an optional agreement filter (``min_score`` with a scorer, e.g. the domain CLIP) drops pairs, every
batch file is merged into ``metadata.jsonl`` (an image folder every recipe's ``--data`` reads, with the prompts'
source recorded per line), ``synth.json`` reports the counts, and ``OUT.partial`` is renamed to OUT.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import PocketdiffError


@dataclass
class SynthConfig:
    steps: int = 25
    sampler: str = "dpmpp_2m"
    guidance: float = 3.0
    seed: int = 0
    batch: int = 16
    min_score: float | None = None  # agreement threshold (None: keep every pair)


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def synthesize(pipe, prompts: list[str], source: str, out: str | Path, cfg: SynthConfig, scorer=None,
               progress: bool = True) -> dict:
    """Generate the pairs into the new folder ``out`` (resuming ``out.partial``); returns the report."""
    from PIL import Image
    from tqdm import tqdm

    from .files import write_text

    out = Path(out)
    if out.exists():
        raise PocketdiffError(f"{out}: already exists; choose another OUT")
    if not prompts:
        raise PocketdiffError(f"{source}: no prompts")
    part = _partial(out)
    part.mkdir(parents=True, exist_ok=True)
    settings = {"steps": cfg.steps, "sampler": cfg.sampler, "guidance": cfg.guidance}
    starts = range(0, len(prompts), cfg.batch)
    for b0 in tqdm(starts, desc="synthesizing", unit="batch", disable=not progress):
        index = part / f"batch-{b0:06d}.jsonl"
        if index.is_file():
            continue
        chunk = prompts[b0:b0 + cfg.batch]
        result = pipe(chunk, steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance,
                      seed=cfg.seed + b0)  # image j of the batch: seed + b0 + j
        lines = []
        for j, (image, prompt) in enumerate(zip(result.images, chunk)):
            name = f"{b0 + j:07d}.png"
            (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(part / name)
            lines.append(json.dumps({"file_name": name, "text": prompt, "source": source, "prompt_index": b0 + j,
                                     "seed": cfg.seed + b0 + j, **settings}))
        write_text(index, "\n".join(lines) + "\n")
    return _finish(part, out, cfg, scorer, source)


def _finish(part: Path, out: Path, cfg: SynthConfig, scorer, source: str) -> dict:
    from PIL import Image

    from .files import write_text

    rows = [json.loads(line) for f in sorted(part.glob("batch-*.jsonl")) for line in f.read_text().splitlines()
            if line.strip()]
    dropped = []
    if scorer is not None and cfg.min_score is not None:
        images = [np.asarray(Image.open(part / r["file_name"]).convert("RGB")) for r in rows]
        scores = scorer(images, [r["text"] for r in rows])
        keep = []
        for r, s in zip(rows, scores):
            r["score"] = float(s)
            (keep if float(s) >= cfg.min_score else dropped).append(r)
        for r in dropped:
            (part / r["file_name"]).unlink()
        rows = keep
    write_text(part / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report = {"source": source, "config": asdict(cfg), "generated": len(rows) + len(dropped), "kept": len(rows),
              "dropped": [{"file_name": r["file_name"], "text": r["text"], "score": r["score"]} for r in dropped]}
    write_text(part / "synth.json", json.dumps(report, indent=2))
    os.replace(part, out)
    for f in out.glob("batch-*.jsonl"):  # merged into metadata.jsonl
        f.unlink()
    return report
