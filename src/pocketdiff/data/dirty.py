"""A deliberately dirty Shapes set (``pocketdiff data shapes --dirty``): web-data faults at documented rates.

Each written pair is, independently, one of (rates of :data:`DIRTY_RATES`; the rest, 52%, clean):

* ``duplicate`` (8%): an exact copy of an earlier pair, image and caption;
* ``near_duplicate`` (6%): an earlier pair's image shifted by one pixel with Gaussian noise (sigma 3 levels);
* ``stored_small`` (4%): the render stored at 24 px (a minimum-size filter's case);
* ``upscaled`` (6%): the render downscaled to 24 px and stored upscaled back to 64 px (blurred, bilinear);
* ``off_centre`` (8%): a 44 px window at a random corner offset, resized to 64 px, so objects move cells and are
  cut, under the original caption;
* ``wrong_word`` (8%): one object's colour or shape word replaced by another (the caption is wrong);
* ``missing_object`` (4%): the caption leaves out one object of a 2- or 3-object scene;
* ``extra_object`` (4%): the caption adds an object in an empty cell.

Captions follow the grammar, so every fault but ``stored_small`` and ``upscaled`` is invisible to a reader that
only parses captions. The truth is written beside the set: ``dirty.json`` has each file's fault and its clean
caption, so a curation can be scored. Written like :func:`pocketdiff.data.shapes.write_dataset` (PNG files and
``metadata.jsonl``, in a temporary folder renamed at the end).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .shapes import GRID, IMAGE_SIZE, PALETTE, SHAPES, Scene, ShapeObject, caption, render, sample_scene

DIRTY_RATES = {"duplicate": 0.08, "near_duplicate": 0.06, "stored_small": 0.04, "upscaled": 0.06,
               "off_centre": 0.08, "wrong_word": 0.08, "missing_object": 0.04, "extra_object": 0.04}
SMALL = 24
POOL = 4096  # earlier pairs a duplicate may copy


def _resize(image: np.ndarray, side: int, resample: str) -> np.ndarray:
    from PIL import Image

    mode = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}[resample]
    return np.asarray(Image.fromarray(image).resize((side, side), mode), dtype=np.uint8)


def _wrong_word(scene: Scene, rng: np.random.Generator) -> Scene:
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if rng.random() < 0.5:
        choices = [c for c in PALETTE if c not in (o.colour, scene.background)]
        objs[i] = replace(o, colour=choices[int(rng.integers(len(choices)))])
    else:
        choices = [s for s in SHAPES if s != o.shape]
        objs[i] = replace(o, shape=choices[int(rng.integers(len(choices)))])
    return Scene(tuple(objs), scene.background)


def _count_fault(scene: Scene, fault: str, rng: np.random.Generator) -> Scene | None:
    objs = list(scene.objects)
    if fault == "missing_object":
        if len(objs) < 2:
            return None
        objs.pop(int(rng.integers(len(objs))))
        return Scene(tuple(objs), scene.background)
    if len(objs) >= 3:
        return None
    free = [c for c in range(GRID * GRID) if c not in {o.cell for o in objs}]
    colours = [c for c in PALETTE if c != scene.background]
    new = ShapeObject(SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(len(colours)))],
                      "large" if rng.random() < 0.5 else "small", int(free[int(rng.integers(len(free)))]))
    return Scene(tuple(sorted(objs + [new], key=lambda o: o.cell)), scene.background)


def dirty_pair(rng: np.random.Generator, fault: str, written: list[tuple[np.ndarray, str, str]]
               ) -> tuple[np.ndarray, str, str, str]:
    """(image, caption, the fault actually applied, the clean caption) of one pair; ``written``: (image, caption,
    clean caption) of earlier pairs that duplicates copy."""
    if fault in ("duplicate", "near_duplicate") and written:
        image, text, clean = written[int(rng.integers(len(written)))]
        if fault == "near_duplicate":
            shifted = np.roll(image, 1, axis=int(rng.integers(2))).astype(np.float32)
            image = np.clip(shifted + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
        return image, text, fault, clean
    scene = sample_scene(rng)
    image, clean = render(scene), caption(scene)
    if fault == "stored_small":
        return _resize(image, SMALL, "box"), clean, fault, clean
    if fault == "upscaled":
        return _resize(_resize(image, SMALL, "box"), IMAGE_SIZE, "bilinear"), clean, fault, clean
    if fault == "off_centre":
        side = 44
        y0, x0 = (int(rng.integers(2)) * (IMAGE_SIZE - side) for _ in range(2))
        return _resize(image[y0:y0 + side, x0:x0 + side].copy(), IMAGE_SIZE, "bilinear"), clean, fault, clean
    if fault == "wrong_word":
        return image, caption(_wrong_word(scene, rng)), fault, clean
    if fault in ("missing_object", "extra_object"):
        changed = _count_fault(scene, fault, rng)
        if changed is not None:
            return image, caption(changed), fault, clean
    return image, clean, "clean", clean


def write_dirty(out_dir: str | os.PathLike, n: int, seed: int = 0, rates: dict | None = None,
                progress: bool = True) -> dict:
    """Write ``n`` dirty pairs to the new folder ``out_dir``; returns the faults' counts."""
    from PIL import Image
    from tqdm import tqdm

    from ..files import atomic_folder

    rates = dict(DIRTY_RATES if rates is None else rates)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; refusing to overwrite it")
    names, probs = list(rates) + ["clean"], list(rates.values()) + [max(0.0, 1.0 - sum(rates.values()))]
    rng = np.random.default_rng(seed)
    written: list[tuple[np.ndarray, str, str]] = []  # a reservoir of up to POOL earlier pairs
    truth, counts = [], {k: 0 for k in names}
    with atomic_folder(out_dir) as tmp, open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in tqdm(range(n), desc=f"writing {out_dir.name}", disable=not progress):
            fault = names[int(rng.choice(len(names), p=np.array(probs) / sum(probs)))]
            image, text, applied, clean = dirty_pair(rng, fault, written)
            name = f"{i:06d}.png"
            Image.fromarray(image).save(tmp / name)
            meta.write(json.dumps({"file_name": name, "text": text}) + "\n")
            if applied not in ("duplicate", "near_duplicate", "stored_small"):
                if len(written) < POOL:
                    written.append((image, text, clean))
                else:
                    written[int(rng.integers(POOL))] = (image, text, clean)
            truth.append({"file_name": name, "fault": applied, "clean_caption": clean})
            counts[applied] += 1
        (tmp / "dirty.json").write_text(json.dumps({"seed": seed, "rates": rates, "counts": counts, "items": truth},
                                                   indent=1))
    return counts


def audit(dirty_dir: str | os.PathLike, report: dict) -> dict[str, dict[str, int]]:
    """Score one curation of a dirty set (``report``: the ``report.json`` that ``pocketdiff data curate`` writes)
    against the set's truth (its ``dirty.json``). Per fault: ``n`` pairs, how many the curation ``dropped``, how many
    it kept with a ``recaptioned`` caption, and how many kept pairs carry their scene's ``clean_caption``.

    An off-centre crop's clean caption is its uncropped scene's, so a captioner that describes the crop is right to
    differ from it; for the other faults the clean caption is the right one.
    """
    truth = json.loads((Path(dirty_dir) / "dirty.json").read_text())["items"]
    by_key = {item["key"]: item for item in report["items"]}
    out: dict[str, dict[str, int]] = {}
    for t in truth:
        row = out.setdefault(t["fault"], {"n": 0, "dropped": 0, "recaptioned": 0, "clean_caption": 0})
        row["n"] += 1
        item = by_key.get(t["file_name"])
        if item is None:
            raise ValueError(f"the curation report has no item for {t['file_name']}: is it a report of {dirty_dir}?")
        if item["status"] == "dropped":
            row["dropped"] += 1
            continue
        row["recaptioned"] += item.get("original_caption") is not None
        row["clean_caption"] += item["caption"] == t["clean_caption"]
    return out
