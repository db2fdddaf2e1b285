"""The Shapes domain: captioned scenes of coloured shapes on a 3 x 3 grid (spec: docs/SHAPES.md).

A scene holds 1 to 3 objects, each a (shape, colour, size) in its own grid cell, on a plain
background of another palette colour. This module samples scenes, writes and parses their
captions, and renders them to 64 x 64 RGB images.

Rendering follows the spec literally: every shape is rasterised at 4x resolution by testing
the centre of each supersample against the exact geometry (even-odd rule; the circle is an
exact disc), and each output pixel is the area average of its 4 x 4 supersamples. Objects
never leave their cell (the largest reaches 10 px from the cell centre, the cell half-width is
10.67 px), so an object is rendered on its own small patch and composited over the background.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_SIZE = 64
GRID = 3  # cells per side
CELL = IMAGE_SIZE / GRID  # cell width in px (21.33)
SUPERSAMPLE = 4  # render at 4x, then area-average 4 x 4 blocks
JITTER = 1.5  # max |offset| of an object centre from its cell centre, px

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross",
)
SIZES: dict[str, float] = {"small": 5.0, "large": 8.5}  # radius R in px
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 20),
    "green": (30, 160, 60),
    "cyan": (40, 210, 230),
    "blue": (30, 60, 220),
    "purple": (140, 50, 190),
    "pink": (255, 130, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
POSITIONS: tuple[str, ...] = (  # by cell index, row-major
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
HELD_OUT: frozenset[tuple[str, str]] = frozenset({  # (colour, shape) pairs never in training data
    ("purple", "star"), ("cyan", "heart"), ("orange", "hexagon"),
    ("pink", "triangle"), ("white", "cross"), ("green", "diamond"),
})
SPLITS = ("train", "heldout", "all")

_ALL_PAIRS = tuple((c, s) for c in PALETTE for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT)
_HELD_OUT_PAIRS = tuple(p for p in _ALL_PAIRS if p in HELD_OUT)  # fixed order, for sampling


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is and where. `cell` is 0..8 row-major; `jitter` is (dx, dy) in px."""

    shape: str
    colour: str
    size: str
    cell: int
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def centre(self) -> tuple[float, float]:
        """(cx, cy) in px, including jitter."""
        cx, cy = cell_centre(self.cell)
        return cx + self.jitter[0], cy + self.jitter[1]

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT


@dataclass(frozen=True)
class Scene:
    """A background colour and 1-3 objects in distinct cells, ordered by cell index."""

    objects: tuple[ShapeObject, ...]
    background: str

    @property
    def held_out(self) -> bool:
        """True if any object is a held-out colour-shape pair."""
        return any(o.held_out for o in self.objects)


def cell_centre(cell: int) -> tuple[float, float]:
    """(x, y) of the centre of grid cell `cell` (row-major), in px."""
    row, col = divmod(cell, GRID)
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, split: str = "train"
) -> Scene:
    """Sample a random scene.

    n_objects: 1..3, uniform when None. split: "train" never emits a held-out colour-shape
    pair; "heldout" makes one uniformly chosen object a held-out pair (the others are drawn
    from all pairs); "all" draws every object from all 88 pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")

    pool = _SEEN_PAIRS if split == "train" else _ALL_PAIRS
    pair_ids = rng.integers(len(pool), size=n)
    pairs = [pool[i] for i in pair_ids]
    if split == "heldout":
        pairs[rng.integers(n)] = _HELD_OUT_PAIRS[rng.integers(len(_HELD_OUT_PAIRS))]

    cells = np.sort(rng.choice(GRID * GRID, size=n, replace=False))
    sizes = rng.integers(len(SIZES), size=n)
    jitters = rng.uniform(-JITTER, JITTER, size=(n, 2))
    size_names = tuple(SIZES)
    objects = tuple(
        ShapeObject(shape, colour, size_names[s], int(cell), (float(dx), float(dy)))
        for (colour, shape), s, cell, (dx, dy) in zip(pairs, sizes, cells, jitters)
    )
    used = {o.colour for o in objects}
    backgrounds = [c for c in PALETTE if c not in used]
    return Scene(objects, backgrounds[rng.integers(len(backgrounds))])


# --------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. "a small red star at the top left and a large blue circle in
    the center on a yellow background" (objects in cell order)."""
    phrases = [
        f"{_article(o.size)} {o.size} {o.colour} {o.shape} {POSITIONS[o.cell]}"
        for o in sorted(scene.objects, key=lambda o: o.cell)
    ]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{objects} on {_article(scene.background)} {scene.background} background"


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_OBJECT_RE = re.compile(
    rf"(?P<article>an?) (?P<size>{_alternation(SIZES)}) (?P<colour>{_alternation(PALETTE)}) "
    rf"(?P<shape>{_alternation(SHAPES)}) (?P<position>{_alternation(POSITIONS)})"
)
_BACKGROUND_RE = re.compile(
    rf"(?P<objects>.+) on (?P<article>an?) (?P<colour>{_alternation(PALETTE)}) background"
)


def parse_caption(text: str) -> Scene:
    """Inverse of `caption`: read a caption back into a Scene (jitter zero, objects in cell order).

    Case and runs of whitespace are ignored; objects may come in any cell order. Raises
    ValueError for anything outside the grammar (wrong article, unknown word, bad joining,
    more than 3 objects, two objects in one cell, background equal to an object colour).
    """
    norm = " ".join(text.lower().split())
    scene_match = _BACKGROUND_RE.fullmatch(norm)
    if scene_match is None:
        raise ValueError(f"not a Shapes caption (expected '... on a <colour> background'): {text!r}")
    _check_article(scene_match["article"], scene_match["colour"], text)

    head, sep, last = scene_match["objects"].rpartition(" and ")
    parts = (head.split(", ") if sep else []) + [last]
    if len(parts) > 3:
        raise ValueError(f"a caption has at most 3 objects, got {len(parts)}: {text!r}")

    objects = []
    for part in parts:
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"{part!r} is not 'a <small|large> <colour> <shape> <position>' in {text!r}"
            )
        _check_article(m["article"], m["size"], text)
        objects.append(ShapeObject(m["shape"], m["colour"], m["size"], POSITIONS.index(m["position"])))

    cells = [o.cell for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects in the same cell: {text!r}")
    if any(o.colour == scene_match["colour"] for o in objects):
        raise ValueError(f"the background colour equals an object colour: {text!r}")
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)), scene_match["colour"])


def _check_article(article: str, word: str, text: str) -> None:
    if article != _article(word):
        raise ValueError(f"expected {_article(word)!r} before {word!r}, got {article!r}: {text!r}")


def caption_words(text: str) -> list[str]:
    """Split a caption into VOCABULARY words; the comma is its own word."""
    return text.replace(",", " ,").split()


VOCABULARY: list[str] = sorted(
    {"a", "an", "and", "on", "background", ","}
    | set(SIZES) | set(PALETTE) | set(SHAPES)
    | {w for p in POSITIONS for w in p.split()}
)


# --------------------------------------------------------------------------- geometry


@cache
def unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices (K, 2) as (x, y) of `shape` for centre (0, 0) and R = 1, y pointing down.

    None for the circle, which is rasterised as an exact disc.
    """

    def ring(angles_deg: np.ndarray, radii: np.ndarray | float = 1.0) -> np.ndarray:
        a = np.deg2rad(angles_deg)
        return np.stack([np.cos(a), np.sin(a)], axis=1) * np.asarray(radii)[..., None]

    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "diamond":
        return np.array([(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)])
    if shape == "triangle":
        return ring(np.array([-90.0, 30.0, 150.0])) + (0.0, 0.15)
    if shape == "hexagon":
        return ring(np.arange(0.0, 360.0, 60.0))
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return ring(-90.0 + 36.0 * np.arange(10), radii) + (0.0, 0.08)
    if shape == "cross":
        a, w = 0.95, 0.33  # arm half-length, arm half-width
        return np.array([
            (-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
            (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w),
        ])
    if shape == "heart":
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        x = 16.0 * np.sin(t) ** 3
        y = 13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x / 17.0, -(y + 2.5) / 17.0], axis=1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@cache
def unit_centroid(shape: str) -> tuple[float, float]:
    """Area centroid (x, y) of the unit shape (shoelace formula; (0, 0) for the circle)."""
    poly = unit_polygon(shape)
    if poly is None:
        return 0.0, 0.0
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2.0
    return float(((x + xn) * cross).sum() / (6 * area)), float(((y + yn) * cross).sum() / (6 * area))


@cache
def _unit_edges(shape: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Outline edges of the unit shape: start (K, 2), end (K, 2) and dx/dy (K,).

    dx/dy does not change with scale; it is 0 for horizontal edges, which cross no scanline.
    """
    poly = unit_polygon(shape)
    if poly is None:
        return None
    end = np.roll(poly, -1, axis=0)
    dx, dy = (end - poly).T
    return poly, end, np.divide(dx, dy, out=np.zeros_like(dx), where=dy != 0)


def _crossings(shape: str, radius: float, cx: float, cy: float, ys: np.ndarray) -> np.ndarray:
    """x of every crossing of the shape's outline with the scanlines ys (rows, 1) -> (rows, K).

    Edges that miss a scanline give +inf. Scanlines are half-open in y, so a vertex on a
    scanline counts once.
    """
    edges = _unit_edges(shape)
    if edges is None:  # disc: two crossings per scanline
        half2 = radius**2 - (ys - cy) ** 2
        half = np.sqrt(np.maximum(half2, 0.0))
        return np.where(half2 > 0, np.concatenate([cx - half, cx + half], axis=1), np.inf)
    start, end, dxdy = edges
    px, py = cx + radius * start[:, 0], cy + radius * start[:, 1]  # (K,)
    qy = cy + radius * end[:, 1]
    crosses = (py <= ys) != (qy <= ys)  # (rows, K)
    return np.where(crosses, px + (ys - py) * dxdy, np.inf)


def coverage_stack(
    items: Sequence[tuple[str, float, float, float]], box: tuple[int, int, int, int]
) -> np.ndarray:
    """Supersample counts of several shapes over one pixel box, one layer per shape.

    items: (shape, radius, cx, cy) in px. box: (y0, y1, x0, x1) in px. Returns
    (N, y1-y0, x1-x0) uint8 counts in 0..16: how many of each pixel's 4 x 4 supersamples
    lie inside the shape (the pixel's coverage is counts / 16). Supersample (i, j) of the box
    sits at (x0 + (j + 0.5)/4, y0 + (i + 0.5)/4) px; it is inside when an odd number of
    outline crossings of its scanline lie to its left (even-odd rule).
    """
    y0, y1, x0, x1 = box
    s = SUPERSAMPLE
    rows, cols = (y1 - y0) * s, (x1 - x0) * s
    ys = (np.arange(rows) + 0.5)[:, None]  # (rows, 1) scanline centres, supersample units
    xs = [  # (rows, K_n) per shape, supersample units relative to the box corner
        _crossings(shape, radius * s, (cx - x0) * s, (cy - y0) * s, ys)
        for shape, radius, cx, cy in items
    ]
    owner = np.repeat(np.arange(len(items)), [x.shape[1] for x in xs])  # (K,)
    xs = np.concatenate(xs, axis=1)  # (rows, K)

    # A crossing at x flips every sample j with j + 0.5 > x, i.e. j >= floor(x - 0.5) + 1.
    # Count flips at flat index (n * rows + row) * (cols + 1) + first; column `cols` absorbs
    # crossings right of the box and misses (inf). Parity of the running count = inside.
    first = np.clip(np.floor(xs - 0.5) + 1, 0, cols).astype(np.intp)  # (rows, K)
    flat = first + (cols + 1) * (np.arange(rows)[:, None] + rows * owner)
    flips = np.bincount(flat.ravel(), minlength=len(items) * rows * (cols + 1))
    flips = flips.reshape(len(items), rows, cols + 1)[:, :, :cols]
    inside = (np.cumsum(flips, axis=2) & 1).astype(np.uint8)  # (N, rows, cols)
    return _block_sum(inside, s)  # (N, h, w)


def _block_sum(x: np.ndarray, s: int) -> np.ndarray:
    """Sum s x s blocks over the last two axes: (..., H*s, W*s) -> (..., H, W).

    Strided adds; several times faster than reshape(...).sum(axis=(-3, -1)) for small arrays.
    """
    cols = sum(x[..., j::s] for j in range(1, s)) + x[..., 0::s]  # (..., H*s, W)
    return sum(cols[..., i::s, :] for i in range(1, s)) + cols[..., 0::s, :]


def coverage(
    shape: str, radius: float, cx: float, cy: float, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Supersample counts (y1-y0, x1-x0) in 0..16 of one shape over `box`; see coverage_stack."""
    return coverage_stack([(shape, radius, cx, cy)], box)[0]


def object_box(obj: ShapeObject) -> tuple[int, int, int, int]:
    """Pixel box (y0, y1, x0, x1) that contains the object, clipped to the image."""
    cx, cy = obj.centre
    r = obj.radius
    return (
        max(math.floor(cy - r) - 1, 0), min(math.ceil(cy + r) + 1, IMAGE_SIZE),
        max(math.floor(cx - r) - 1, 0), min(math.ceil(cx + r) + 1, IMAGE_SIZE),
    )


# --------------------------------------------------------------------------- rendering


_PALETTE_U16 = {name: np.array(rgb, np.uint16) for name, rgb in PALETTE.items()}


def render_into(out: np.ndarray, scene: Scene) -> np.ndarray:
    """Render `scene` into `out` (64, 64, 3) uint8, in place; returns `out`."""
    out[...] = PALETTE[scene.background]
    full = SUPERSAMPLE * SUPERSAMPLE
    for obj in scene.objects:
        y0, y1, x0, x1 = box = object_box(obj)
        k = coverage(obj.shape, obj.radius, *obj.centre, box)[..., None].astype(np.uint16)  # (h, w, 1)
        under = out[y0:y1, x0:x1].astype(np.uint16)  # (h, w, 3)
        fg = _PALETTE_U16[obj.colour]  # (3,)
        # Area average of k object samples and (16 - k) samples beneath, rounded half up.
        out[y0:y1, x0:x1] = (k * fg + (full - k) * under + full // 2) // full
    return out


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a (64, 64, 3) uint8 RGB image."""
    return render_into(np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), scene)


def sample_batch(
    rng: np.random.Generator, batch_size: int, split: str = "train"
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Sample and render a batch: images (B, 64, 64, 3) uint8, captions, scenes."""
    scenes = [sample_scene(rng, split=split) for _ in range(batch_size)]
    images = np.empty((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # (B, H, W, 3)
    for image, scene in zip(images, scenes):
        render_into(image, scene)
    return images, [caption(s) for s in scenes], scenes


# --------------------------------------------------------------------------- dataset files


def write_dataset(
    out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train", progress: bool = True
) -> Path:
    """Write `n` rendered scenes as a Hugging Face "imagefolder" dataset and return its path.

    Layout: out_dir/{i:06d}.png and out_dir/metadata.jsonl with one {"file_name", "text"}
    object per line. The files are written into a temporary sibling directory that is renamed
    to `out_dir` at the end, so `out_dir` is either complete or absent. Raises FileExistsError
    if `out_dir` exists and is not an empty directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    from ..files import atomic_folder

    rng = np.random.default_rng(seed)
    with atomic_folder(out_dir, overwrite=True) as tmp:  # out_dir is absent or empty (checked above)
        width = max(6, len(str(n - 1)))
        image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for i in tqdm(range(n), desc=f"writing {out_dir.name}", disable=not progress):
                scene = sample_scene(rng, split=split)
                name = f"{i:0{width}d}.png"
                Image.fromarray(render_into(image, scene)).save(tmp / name)
                meta.write(json.dumps({"file_name": name, "text": caption(scene)}) + "\n")
    return out_dir


def write_shards(out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train", shard_size: int = 1000,
                 progress: bool = True) -> Path:
    """Write the same ``n`` scenes as :func:`write_dataset` (same seed, same order) as webdataset tar shards
    ``out_dir/shapes-00000.tar``, ... of ``shard_size`` samples, each ``{key}.png`` + ``{key}.txt``; atomic like it."""
    import io

    import webdataset as wds

    from ..files import atomic_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    with atomic_folder(out_dir, overwrite=True) as tmp:
        writer = None
        for i in tqdm(range(n), desc=f"writing {out_dir.name}", disable=not progress):
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(str(tmp / f"shapes-{i // shard_size:05d}.tar"))
            scene = sample_scene(rng, split=split)
            png = io.BytesIO()
            Image.fromarray(render_into(image, scene)).save(png, format="PNG")
            writer.write({"__key__": f"{i:06d}", "png": png.getvalue(), "txt": caption(scene)})
        if writer is not None:
            writer.close()
    return out_dir


# --------------------------------------------------------------------------- prompts outside the grammar


def nearest_caption(text: str) -> str:
    """The valid caption closest to a free-form prompt, from the grammar words it contains.

    Each shape word found becomes an object, with the nearest colour and size words before it (else "large" and
    the first colour no other object or the background uses) and the position phrase after it (else the next free
    cell, from the center); "on a/an COLOUR background" (else a colour no object has) gives the background. A prompt
    without a shape word gets a fixed example. Used to tell a user what a Shapes model can draw."""
    words = " ".join(text.lower().replace(",", " ").split())
    tokens = words.split()
    bg_match = re.search(rf"\bon an? ({_alternation(PALETTE)}) background\b", words)
    objects: list[ShapeObject] = []
    for i, tok in enumerate(tokens):
        if tok not in SHAPES:
            continue
        before = tokens[max(0, i - 3):i]
        colour = next((w for w in reversed(before) if w in PALETTE), None)
        size = next((w for w in reversed(before) if w in SIZES), "large")
        after = " ".join(tokens[i + 1:i + 5])
        cell = next((c for c, p in sorted(enumerate(POSITIONS), key=lambda cp: -len(cp[1]))  # longest first:
                     if after.startswith(p)), None)  # "at the bottom right" before "at the bottom"
        used = {o.cell for o in objects}
        if cell is None or cell in used:
            cell = next(c for c in (4, 0, 2, 6, 8, 1, 3, 5, 7) if c not in used)
        objects.append(ShapeObject(tok, colour or "", size, cell))
        if len(objects) == 3:
            break
    if not objects:
        return "a large red star in the center on a white background"
    background = bg_match.group(1) if bg_match else None
    taken = {o.colour for o in objects if o.colour} | ({background} if background else set())
    free = [c for c in ("red", "blue", "yellow", "green", "black", "white", *PALETTE) if c not in taken]
    objects = [o if o.colour else ShapeObject(o.shape, free.pop(0), o.size, o.cell) for o in objects]
    if background is None or background in {o.colour for o in objects}:
        background = next(c for c in ("white", "black", "gray", *PALETTE) if c not in {o.colour for o in objects})
    return caption(Scene(tuple(sorted(objects, key=lambda o: o.cell)), background))


def grammar_warning(prompt: str) -> str | None:
    """None for a valid Shapes caption, else one line naming the problem and the nearest valid caption."""
    try:
        parse_caption(prompt)
        return None
    except ValueError:
        return (f"{prompt[:60]!r} is not a Shapes caption (this model knows only the grammar of docs/SHAPES.md); "
                f"nearest: {nearest_caption(prompt)!r}")
