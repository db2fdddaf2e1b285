"""Analytic checker for Shapes images: does a 64 x 64 image show what its caption says?

Method (docs/SHAPES.md, "The checker"):
1. Background: the palette colour nearest to most pixels; its measured colour is the median of
   those pixels.
2. Foreground: pixels farther than FOREGROUND_DISTANCE (sRGB, Euclidean) from the background,
   less isolated specks (fewer than MIN_NEIGHBOURS foreground neighbours). A cell holds an
   object when it has at least MIN_OBJECT_PIXELS foreground pixels; objects found in cells the
   caption leaves empty are "extra".
3. Colour: the palette colour nearest to the mean of the object's core pixels (those at least
   CORE_FRACTION as far from the background as the cell's 90th-percentile foreground pixel).
4. Shape and size: the object's coverage alpha (projection of each pixel onto the
   background -> object colour line) is compared by soft IoU, sum(min) / sum(max), with the
   16 shape/size templates rendered by the Shapes renderer, each placed so that its area
   centroid falls on the object's alpha centroid. The best template names shape and size.
Position is not judged separately: an object is looked for in the cell the caption names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from pocketdiff.data.shapes import (
    CELL, GRID, IMAGE_SIZE, JITTER, PALETTE, SHAPES, SIZES, SUPERSAMPLE, Scene, ShapeObject,
    cell_centre, coverage_stack, parse_caption, unit_centroid,
)

FOREGROUND_DISTANCE = 35.0  # ~40% of the closest palette pair (orange-yellow, 87.5)
MIN_OBJECT_PIXELS = 10  # the smallest object (small star) covers ~33 px
MIN_NEIGHBOURS = 2  # a foreground pixel counts towards an object only with this many fg neighbours
CORE_FRACTION = 0.85
MAX_OFFSET = JITTER + 1.5  # templates are placed at most this far from the cell centre, px

PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)
TEMPLATES: tuple[tuple[str, str], ...] = tuple((shape, size) for size in SIZES for shape in SHAPES)
CELL_EDGES: tuple[int, ...] = tuple(round(i * CELL) for i in range(GRID + 1))  # (0, 21, 43, 64)
ATTRIBUTES = ("present", "colour", "shape", "size")

_PALETTE_RGB = np.array(list(PALETTE.values()), np.float32)  # (11, 3)
_PALETTE_SQ = (_PALETTE_RGB**2).sum(axis=1)  # (11,)


def nearest_palette(rgb: np.ndarray) -> np.ndarray:
    """Index into PALETTE of the nearest colour for each of (..., 3) sRGB values -> (...)."""
    rgb = np.asarray(rgb, np.float32)
    # |p - c|^2 = |c|^2 - 2 p.c + |p|^2; the last term does not change the argmin.
    d2 = _PALETTE_SQ - 2.0 * rgb @ _PALETTE_RGB.T  # (..., 11)
    return d2.argmin(axis=-1)


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """Pixel box (y0, y1, x0, x1) of grid cell `cell` (row-major): pixels whose centre is inside."""
    row, col = divmod(cell, GRID)
    return CELL_EDGES[row], CELL_EDGES[row + 1], CELL_EDGES[col], CELL_EDGES[col + 1]


def _as_scene(scene_or_caption: Scene | str) -> Scene:
    if isinstance(scene_or_caption, str):
        return parse_caption(scene_or_caption)
    return scene_or_caption


def check(image: np.ndarray, scene_or_caption: Scene | str) -> dict:
    """Check a (64, 64, 3) uint8 image against a Scene or caption.

    Returns a JSON-friendly dict:
      background: {"expected", "predicted", "correct"}
      objects: one dict per expected object, in cell order: "cell", "expected" (shape, colour,
        size), "held_out", the booleans "present", "colour", "shape", "size", "correct", and
        "predicted" (colour, shape, size, iou; None when the object is absent)
      extra_cells: cells the caption leaves empty that hold an object
      no_extra, n_objects, held_out, all_correct
    """
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a (64, 64, 3) uint8 image, got {image.shape} {image.dtype}")
    scene = _as_scene(scene_or_caption)
    img, bg_index, bg_rgb, dist, counts = _read_scene(image)

    objects = [_check_object(img, dist, bg_rgb, obj, int(counts[obj.cell])) for obj in scene.objects]
    expected_cells = {o.cell for o in scene.objects}
    extra = [c for c in range(GRID * GRID) if c not in expected_cells and counts[c] >= MIN_OBJECT_PIXELS]
    background = {
        "expected": scene.background,
        "predicted": PALETTE_NAMES[bg_index],
        "correct": PALETTE_NAMES[bg_index] == scene.background,
    }
    return {
        "background": background,
        "objects": objects,
        "extra_cells": extra,
        "no_extra": not extra,
        "n_objects": len(scene.objects),
        "held_out": scene.held_out,
        "all_correct": background["correct"] and not extra and all(o["correct"] for o in objects),
    }


def _read_scene(image: np.ndarray) -> tuple:
    """(float image, background palette index, background rgb, distance from it (H, W), fg pixels per cell (9,))."""
    img = image.astype(np.float32)  # (H, W, 3)
    labels = nearest_palette(img)  # (H, W)
    bg_index = int(np.bincount(labels.ravel(), minlength=len(PALETTE)).argmax())
    bg_rgb = np.median(img[labels == bg_index], axis=0)  # (3,)
    dist = np.linalg.norm(img - bg_rgb, axis=-1)  # (H, W)
    solid = _drop_specks(dist > FOREGROUND_DISTANCE).astype(np.int32)  # (H, W)
    starts = list(CELL_EDGES[:-1])
    counts = np.add.reduceat(np.add.reduceat(solid, starts, 0), starts, 1).ravel()  # (9,) per cell
    return img, bg_index, bg_rgb, dist, counts


def describe(image: np.ndarray) -> Scene:
    """The scene a (64, 64, 3) uint8 image shows, read as the checker reads it: the background, and in each cell
    with an object its colour, shape and size (the best template). An analytic captioner for Shapes images:
    ``caption(describe(render(scene)))`` gives back the scene's caption (a test)."""
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a (64, 64, 3) uint8 image, got {image.shape} {image.dtype}")
    img, bg_index, bg_rgb, dist, counts = _read_scene(image)
    objects = []
    for cell in range(GRID * GRID):
        if counts[cell] >= MIN_OBJECT_PIXELS:
            colour, shape, size, _ = _read_object(img, dist, bg_rgb, cell)
            objects.append(ShapeObject(shape, colour, size, cell))
    return Scene(tuple(objects), PALETTE_NAMES[bg_index])


def _read_object(img: np.ndarray, dist: np.ndarray, bg_rgb: np.ndarray, cell: int) -> tuple[str, str, str, float]:
    """(colour, shape, size, template IoU) of the object in ``cell``."""
    y0, y1, x0, x1 = box = cell_box(cell)
    pixels, d = img[y0:y1, x0:x1], dist[y0:y1, x0:x1]  # (h, w, 3), (h, w)
    core = d >= CORE_FRACTION * np.percentile(d[d > FOREGROUND_DISTANCE], 90)
    fg_rgb = pixels[core].mean(axis=0)  # (3,)
    colour = PALETTE_NAMES[int(nearest_palette(fg_rgb))]
    axis = fg_rgb - bg_rgb
    alpha = np.clip((pixels - bg_rgb) @ axis / max(axis @ axis, 1e-6), 0.0, 1.0)  # (h, w) coverage
    shape, size, iou = match_template(alpha, box, cell)
    return colour, shape, size, iou


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Keep the pixels of a (H, W) bool mask that have >= MIN_NEIGHBOURS set 8-neighbours.

    Removes isolated noise pixels so they do not count as objects; shapes keep nearly all
    their pixels.
    """
    padded = np.pad(mask, 1).astype(np.uint8)  # (H+2, W+2)
    h, w = mask.shape
    neighbours = sum(
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    )
    return mask & (neighbours >= MIN_NEIGHBOURS)


def _check_object(
    img: np.ndarray, dist: np.ndarray, bg_rgb: np.ndarray, obj: ShapeObject, n_foreground: int
) -> dict:
    """Check one expected object in its cell. img (H, W, 3), dist (H, W) from the background."""
    result = {
        "cell": obj.cell,
        "expected": {"shape": obj.shape, "colour": obj.colour, "size": obj.size},
        "held_out": obj.held_out,
        "present": n_foreground >= MIN_OBJECT_PIXELS,
        "colour": False, "shape": False, "size": False, "correct": False,
        "predicted": None,
    }
    if not result["present"]:
        return result

    colour, shape, size, iou = _read_object(img, dist, bg_rgb, obj.cell)

    result.update(colour=colour == obj.colour, shape=shape == obj.shape, size=size == obj.size)
    result["correct"] = result["colour"] and result["shape"] and result["size"]
    result["predicted"] = {"colour": colour, "shape": shape, "size": size, "iou": iou}
    return result


def match_template(
    alpha: np.ndarray, box: tuple[int, int, int, int], cell: int
) -> tuple[str, str, float]:
    """Best (shape, size, soft IoU) for a coverage map alpha (h, w) over pixel box `box`.

    Each template is rendered with its area centroid on alpha's centroid (clamped to within
    MAX_OFFSET px of the cell centre), so jitter needs no search.
    """
    y0, y1, x0, x1 = box
    mass = alpha.sum()
    ay = (alpha.sum(axis=1) @ (np.arange(y0, y1) + 0.5)) / mass  # alpha centroid, px
    ax = (alpha.sum(axis=0) @ (np.arange(x0, x1) + 0.5)) / mass
    gx, gy = cell_centre(cell)

    placed = []  # (shape, radius, cx, cy) per template
    for shape, size in TEMPLATES:
        r = SIZES[size]
        ux, uy = unit_centroid(shape)
        cx = min(max(ax - r * ux, gx - MAX_OFFSET), gx + MAX_OFFSET)
        cy = min(max(ay - r * uy, gy - MAX_OFFSET), gy + MAX_OFFSET)
        placed.append((shape, r, cx, cy))
    templates = coverage_stack(placed, box) / float(SUPERSAMPLE * SUPERSAMPLE)  # (16, h, w)

    inter = np.minimum(templates, alpha).sum(axis=(1, 2))  # (16,)
    union = np.maximum(templates, alpha).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1e-6)
    best = int(iou.argmax())
    return TEMPLATES[best][0], TEMPLATES[best][1], float(iou[best])


# --------------------------------------------------------------------------- aggregation


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def _object_rates(objects: Sequence[dict]) -> dict:
    """Per-object accuracy of each attribute and of all of them ("correct")."""
    rates = {"n": len(objects)}
    for key in ATTRIBUTES + ("correct",):
        rates[key] = _rate([o[key] for o in objects])
    return rates


def _shape_confusion(objects: Sequence[dict]) -> dict:
    """Per expected shape: how often it was drawn at all ("present"), drawn as itself ("shape"), and
    what the checker matched instead ("predicted": counts over the drawn ones, one per shape)."""
    out = {}
    for name in SHAPES:
        mine = [o for o in objects if o["expected"]["shape"] == name]
        drawn = Counter(o["predicted"]["shape"] for o in mine if o["predicted"] is not None)
        out[name] = {"n": len(mine), "present": _rate([o["present"] for o in mine]),
                     "shape": _rate([o["shape"] for o in mine]),
                     "predicted": {s: drawn.get(s, 0) for s in SHAPES}}
    return out


def _scene_rates(results: Sequence[dict]) -> dict:
    """Scene-level rates plus per-object attribute accuracy over those scenes' objects."""
    rates = {"n": len(results)}
    rates["all_correct"] = _rate([r["all_correct"] for r in results])
    rates["background"] = _rate([r["background"]["correct"] for r in results])
    rates["no_extra"] = _rate([r["no_extra"] for r in results])
    objects = _object_rates([o for r in results for o in r["objects"]])
    rates.update({key: objects[key] for key in ATTRIBUTES})
    return rates


def aggregate(results: Sequence[dict], scenes: Sequence[Scene | str] | None = None) -> dict:
    """Summarise `check` results: rates over all scenes, by object count and by seen/held-out.

    Object attribute rates count a missing object as wrong. A scene is "heldout" when any of
    its objects is a held-out colour-shape pair; "objects_by_split" splits objects by their own
    pair; "by_shape" is the confusion of each expected shape. `scenes` (the checked scenes or
    captions, same order) defaults to what each result records. Empty groups have n = 0 and NaN
    rates.
    """
    if scenes is not None:
        if len(scenes) != len(results):
            raise ValueError(f"{len(results)} results but {len(scenes)} scenes")
        results = [
            {**r, "n_objects": len(s.objects), "held_out": s.held_out}
            for r, s in zip(results, map(_as_scene, scenes))
        ]
    objects = [o for r in results for o in r["objects"]]
    summary = _scene_rates(results)
    summary["by_count"] = {
        k: _scene_rates([r for r in results if r["n_objects"] == k]) for k in range(1, 4)
    }
    summary["by_split"] = {
        name: _scene_rates([r for r in results if r["held_out"] == held])
        for name, held in (("seen", False), ("heldout", True))
    }
    summary["objects_by_split"] = {
        name: _object_rates([o for o in objects if o["held_out"] == held])
        for name, held in (("seen", False), ("heldout", True))
    }
    summary["by_shape"] = _shape_confusion(objects)
    return summary
