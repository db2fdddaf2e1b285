"""Curation of an image-caption set (EdgeFusion's data lever): ``pocketdiff data curate IN OUT``.

Steps, in this order, each optional and reported per image (kept / dropped / changed, with reasons):

1. **read**: an image that cannot be decoded is dropped ("unreadable");
2. **size**: images whose short side is under ``min_size`` px or whose aspect ratio (long / short) is over
   ``max_aspect`` are dropped;
3. **fit**: centre crop to a square and resize to ``resolution`` px (changed: "fitted from WxH");
4. **dedup**: a colour perceptual hash of the fitted image (``imagehash.phash`` of each RGB channel at
   ``hash_size=16``, 3 x 256 bits); an image within ``hash_threshold`` bits of one kept before it is dropped
   ("duplicate of KEY (d bits)"; 0: same hash). Measured on a dirty Shapes set (1500 pairs): 64-bit grey or
   per-channel hashes give different scenes of one layout the same hash (8-bit hashes within 6 bits: 11% of
   clean pairs matched an earlier, different one); at 16 x 16, no clean pair shares a hash and within the
   default 64 bits 0.5% do, while 8% of one-pixel-shifted noisy copies are caught (31% within 96 bits, at
   1.9% of clean pairs); exact copies are always caught;
5. **recaption**: a pluggable captioner (``captioner(images) -> captions``; see :mod:`pocketdiff.eval.captioners`):
   ``caption_mode`` "keep" fills only missing captions, "replace" takes the captioner's, "merge" keeps the original
   and appends the captioner's where they differ; an image still without a caption is dropped ("no caption");
6. **agreement**: a pluggable scorer (``scorer(images, captions) -> scores``: the domain CLIP for Shapes, or a
   local CLIP) drops pairs scoring under ``min_score``.

Input: an image folder (``metadata.jsonl`` with ``file_name`` / ``text``, or ``img.txt`` beside ``img.png``) or
webdataset tar shards. OUT: ``images/*.png`` + ``metadata.jsonl`` (an image folder every recipe's ``--data``
reads), ``report.json`` (every input's fate and the counts per step) and ``report.html`` (a contact sheet of
what was dropped and changed, for a person to review). OUT is written in a temporary folder beside it and
renamed at the end: an interrupted run leaves no OUT.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import PocketdiffError

Captioner = Callable[[list[np.ndarray]], list[str]]
Scorer = Callable[[list[np.ndarray], list[str]], np.ndarray]
CAPTION_MODES = ("keep", "replace", "merge")
HASH_SIZE = 16  # imagehash.phash side: HASH_SIZE**2 bits per channel
HASH_BITS = 3 * HASH_SIZE**2


@dataclass
class CurateConfig:
    dedup: bool = True
    hash_threshold: int = 64  # bits of the 768-bit hash within which two images are near-duplicates (0: same hash)
    min_size: int = 0  # px of the short side (0: no filter)
    max_aspect: float = 0.0  # long side / short side (0: no filter)
    resolution: int = 0  # centre crop + resize to this many px (0: keep each image's size)
    caption_mode: str = "keep"
    min_score: float | None = None  # agreement threshold of the scorer (None: no filter)
    sheet_limit: int = 200  # thumbnails per section of the contact sheet

    def __post_init__(self) -> None:
        if self.caption_mode not in CAPTION_MODES:
            raise PocketdiffError(f"--caption-mode must be one of {', '.join(CAPTION_MODES)}, got {self.caption_mode!r}")
        if not 0 <= self.hash_threshold <= HASH_BITS // 4 or self.min_size < 0 or self.max_aspect < 0 or self.resolution < 0:
            raise PocketdiffError(f"--hash-threshold must be 0-{HASH_BITS // 4}; "
                                  "--min-size, --max-aspect, --resolution >= 0")


@dataclass
class Item:
    key: str
    caption: str | None
    image: np.ndarray | None = None  # (H, W, 3) uint8 once read
    status: str = "kept"  # kept | changed | dropped
    reasons: list[str] = field(default_factory=list)
    original_caption: str | None = None
    original_size: tuple[int, int] | None = None
    thumb: str | None = None  # a base64 PNG thumbnail for the contact sheet
    kinds: list[str] = field(default_factory=list)  # each reason's kind, for the counts

    def drop(self, reason: str, kind: str | None = None) -> None:
        if self.image is not None:
            self.thumb = _thumb(self.image)
        self.status, self.image = "dropped", None
        self.reasons.append(reason)
        self.kinds.append(kind or reason)

    def change(self, reason: str, kind: str | None = None) -> None:
        if self.status != "dropped":
            self.status = "changed"
        self.reasons.append(reason)
        self.kinds.append(kind or reason)


# ---- reading ---------------------------------------------------------------------------------------------
def read_items(source: str | Path) -> Iterator[tuple[str, object, str | None]]:
    """(key, image path or bytes, caption or None) of every entry of an image folder or tar shards."""
    from .datasets import SHARD_IMAGE_KEYS, FolderData, _shard_caption, _shard_urls

    src = Path(source)
    if src.is_dir():
        rows = FolderData(str(src))._read_index()
        if not rows:
            raise PocketdiffError(f"{src}: no images (expected metadata.jsonl or image files with .txt captions)")
        for path, text in rows:
            yield str(path.relative_to(src)) if path.is_relative_to(src) else str(path), path, text
        return
    urls = _shard_urls(str(source))
    if not urls:
        raise PocketdiffError(f"{source}: not an image folder and no tar shards match it")
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False):
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        yield str(sample.get("__key__")), (sample[key] if key else None), _shard_caption(sample)


def decode(data) -> np.ndarray | None:
    """RGB uint8 (H, W, 3) of an image path or bytes, or None when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        return None
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


# ---- the steps ---------------------------------------------------------------------------------------------
def size_step(item: Item, cfg: CurateConfig) -> None:
    h, w = item.image.shape[:2]
    short, long = min(h, w), max(h, w)
    if cfg.min_size and short < cfg.min_size:
        item.drop(f"small ({w}x{h} < {cfg.min_size} px)", "small")
    elif cfg.max_aspect and long / short > cfg.max_aspect:
        item.drop(f"aspect {long / short:.2f} > {cfg.max_aspect}", "aspect")


def fit_step(item: Item, cfg: CurateConfig) -> None:
    from PIL import Image

    from .datasets import fit

    h, w = item.image.shape[:2]
    if cfg.resolution and (h, w) != (cfg.resolution, cfg.resolution):
        item.image = fit(Image.fromarray(item.image), cfg.resolution)
        item.change(f"fitted from {w}x{h}", "fitted")


class Deduplicator:
    """Perceptual-hash near-duplicate search: multi-index hashing (a ``bits``-bit hash split into threshold + 1
    chunks; two hashes within ``threshold`` bits share at least one chunk exactly), so each lookup scans few
    candidates."""

    def __init__(self, threshold: int, bits: int = HASH_BITS):
        self.threshold, self.bits = threshold, bits
        self.parts = min(threshold + 1, bits // 4)
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(self.parts)]
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def _chunks(self, h: int) -> list[int]:
        bits = self.bits // self.parts
        return [(h >> (i * bits)) & ((1 << bits) - 1) if i < self.parts - 1 else h >> (i * bits)
                for i in range(self.parts)]

    def find(self, h: int) -> tuple[str, int] | None:
        """(key, distance) of a kept image within the threshold, else None."""
        best = None
        for table, chunk in zip(self.tables, self._chunks(h)):
            for j in table.get(chunk, ()):
                d = (h ^ self.hashes[j]).bit_count()
                if d <= self.threshold and (best is None or d < best[1]):
                    best = (self.keys[j], d)
        return best

    def add(self, h: int, key: str) -> None:
        for table, chunk in zip(self.tables, self._chunks(h)):
            table.setdefault(chunk, []).append(len(self.hashes))
        self.hashes.append(h)
        self.keys.append(key)


def phash(image: np.ndarray) -> int:
    """The colour perceptual hash: the 256-bit pHash of each RGB channel, as one 768-bit integer."""
    import imagehash
    from PIL import Image

    bits = np.concatenate([imagehash.phash(c, hash_size=HASH_SIZE).hash.ravel() for c in Image.fromarray(image).convert("RGB").split()])
    return int("".join("1" if b else "0" for b in bits), 2)


def caption_step(items: list[Item], captioner: Captioner | None, mode: str) -> None:
    """Recaption a batch of items (those still kept) and drop the ones left without a caption."""
    live = [it for it in items if it.status != "dropped"]
    todo = [it for it in live if mode != "keep" or not it.caption] if captioner else []
    if todo:
        for it, new in zip(todo, captioner([it.image for it in todo])):
            new = new.strip()
            if not it.caption:
                it.caption = new
                it.change("captioned (had none)")
            elif mode == "replace" and new != it.caption:
                it.original_caption, it.caption = it.caption, new
                it.change("caption replaced")
            elif mode == "merge" and new and new not in it.caption:
                it.original_caption, it.caption = it.caption, f"{it.caption}. {new}"
                it.change("caption merged")
    for it in live:
        if not it.caption:
            it.drop("no caption")


def score_step(items: list[Item], scorer: Scorer | None, threshold: float | None) -> None:
    live = [it for it in items if it.status != "dropped"]
    if scorer is None or threshold is None or not live:
        return
    for it, s in zip(live, scorer([it.image for it in live], [it.caption for it in live])):
        if float(s) < threshold:
            it.drop(f"agreement {float(s):.3f} < {threshold}", "agreement")


# ---- the run ---------------------------------------------------------------------------------------------
def curate(source: str | Path, out: str | Path, cfg: CurateConfig, captioner: Captioner | None = None,
           scorer: Scorer | None = None, batch: int = 64, progress: bool = True) -> dict:
    """Curate ``source`` into the new folder ``out``; returns the report (also in ``out/report.json``)."""
    from tqdm import tqdm

    from ..files import atomic_folder

    out = Path(out)
    if out.exists():
        raise PocketdiffError(f"{out}: already exists; choose another OUT (curation never writes over a folder)")
    if not out.parent.is_dir():
        raise PocketdiffError(f"{out.parent}: folder does not exist; create it first")
    entries = iter(read_items(source))
    first = next(entries, None)
    if first is None:
        raise PocketdiffError(f"{source}: empty (no images to curate)")
    dedup = Deduplicator(cfg.hash_threshold) if cfg.dedup else None
    report: list[Item] = []
    with atomic_folder(out) as tmp, open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
        (tmp / "images").mkdir()
        bar = tqdm(desc="curating", unit="image", disable=not progress)
        chunk: list[Item] = []
        for entry in _chain(first, entries):
            chunk.append(_first_steps(entry, cfg, dedup))
            if len(chunk) == batch:
                _finish(chunk, cfg, captioner, scorer, tmp, meta, report)
                bar.update(len(chunk))
                chunk = []
        _finish(chunk, cfg, captioner, scorer, tmp, meta, report)
        bar.update(len(chunk))
        bar.close()
        summary = summarise(report, source, cfg)
        (tmp / "report.json").write_text(json.dumps(summary, indent=2))
        (tmp / "report.html").write_text(contact_sheet(report, summary, cfg.sheet_limit))
    return summary


def _chain(first, rest):
    yield first
    yield from rest


def _first_steps(entry, cfg: CurateConfig, dedup: Deduplicator | None) -> Item:
    key, data, text = entry
    item = Item(key, (text or "").strip() or None)
    item.image = decode(data)
    if item.image is None:
        item.drop("unreadable" if data is not None else "no image")
        return item
    item.original_size = (int(item.image.shape[1]), int(item.image.shape[0]))
    size_step(item, cfg)
    if item.status != "dropped":
        fit_step(item, cfg)
    if item.status != "dropped" and dedup is not None:
        h = phash(item.image)
        hit = dedup.find(h)
        if hit is not None:
            item.drop(f"duplicate of {hit[0]} ({hit[1]} bits)", "duplicate")
        else:
            dedup.add(h, key)
    return item


def _finish(chunk: list[Item], cfg, captioner, scorer, tmp: Path, meta, report: list[Item]) -> None:
    from PIL import Image

    caption_step(chunk, captioner, cfg.caption_mode)
    score_step(chunk, scorer, cfg.min_score)
    for it in chunk:
        if it.status != "dropped":
            name = f"images/{len(report):07d}.png"
            Image.fromarray(it.image).save(tmp / name)
            meta.write(json.dumps({"file_name": name, "text": it.caption, "source": it.key}) + "\n")
            it.thumb = _thumb(it.image)
        report.append(it)
        it.image = None  # only thumbnails are kept in memory


def _thumb(image: np.ndarray, side: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(image)
    im.thumbnail((side, side))
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def summarise(report: list[Item], source, cfg: CurateConfig) -> dict:
    counts = {"input": len(report), "kept": sum(it.status == "kept" for it in report),
              "changed": sum(it.status == "changed" for it in report),
              "dropped": sum(it.status == "dropped" for it in report)}
    by_reason: dict[str, int] = {}
    for it in report:
        for kind in it.kinds:
            by_reason[kind] = by_reason.get(kind, 0) + 1
    return {"source": str(source), "config": asdict(cfg), "counts": counts, "by_reason": by_reason,
            "items": [{"key": it.key, "status": it.status, "reasons": it.reasons, "caption": it.caption,
                       "original_caption": it.original_caption, "original_size": it.original_size}
                      for it in report]}


def contact_sheet(report: list[Item], summary: dict, limit: int) -> str:
    """An HTML page: the counts, then thumbnails of the changed and (by reason) the dropped images."""
    def cell(it: Item) -> str:
        img = f'<img src="data:image/png;base64,{it.thumb}">' if it.thumb else "<div>no image</div>"
        was = f"<br><s>{html.escape(it.original_caption)}</s>" if it.original_caption else ""
        return (f'<figure>{img}<figcaption><b>{html.escape(it.key)}</b><br>{html.escape("; ".join(it.reasons))}'
                f"<br>{html.escape(it.caption or '')}{was}</figcaption></figure>")

    sections = []
    for status in ("changed", "dropped"):
        chosen = [it for it in report if it.status == status][:limit]
        sections.append(f"<h2>{status} ({summary['counts'][status]})</h2>" + "".join(cell(it) for it in chosen))
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["by_reason"].items())
    return ("<!doctype html><meta charset=utf-8><title>pocketdiff data curate</title><style>figure{display:inline-"
            "block;width:180px;vertical-align:top;font:11px sans-serif}img{width:64px;image-rendering:pixelated}"
            f"</style><h1>{html.escape(summary['source'])}</h1><p>{counts}</p><p>{html.escape(reasons)}</p>"
            + "".join(sections))
