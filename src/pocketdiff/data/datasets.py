"""Image-caption data for the recipes, from three sources behind one interface (``--data`` on every training
recipe: teacher, kd and lcm pool its images' latents; step and decoder take its captions as the prompts of the
teacher's generations, and decoder its images too):

- ``shapes`` (the default): the procedural Shapes stream (docs/SHAPES.md), fresh scenes from a seed;
- an image folder with captions: the Hugging Face ``imagefolder`` layout (images plus ``metadata.jsonl`` lines
  ``{"file_name": ..., "text": ...}``) or the sidecar layout (``img.png`` beside ``img.txt``);
- webdataset tar shards: a path, a glob (``shards/*.tar``) or a brace pattern (``shards/{000..009}.tar``) whose
  samples hold an image (``png``, ``jpg``/``jpeg`` or ``webp``) and a caption (``txt``, or ``json`` with ``text``
  or ``caption``), read as a stream.

Every image is converted to RGB and fitted to ``resolution`` (resize of the short side, then a centre or a random
crop; a random horizontal flip is off by default: it would mirror "left" and "right" in a caption). An image that
cannot be read is skipped and counted (``Dataset.skipped``), never a crash mid-run; a source with no usable
sample is a one-line error when it is opened, before any model loads. Caption dropout for CFG stays in the
recipes' batches.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import PocketdiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def fit(image, resolution: int, crop: str = "center", flip: bool = False,
        rng: np.random.Generator | None = None) -> np.ndarray:
    """A PIL image as (resolution, resolution, 3) uint8: RGB, short side resized to ``resolution``, cropped."""
    from PIL import Image

    rng = rng if rng is not None else np.random.default_rng(0)
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    w, h = image.size
    if crop == "random":
        x0, y0 = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    else:
        x0, y0 = (w - resolution) // 2, (h - resolution) // 2
    out = np.asarray(image.crop((x0, y0, x0 + resolution, y0 + resolution)), dtype=np.uint8)
    return out[:, ::-1].copy() if flip and rng.random() < 0.5 else out


@dataclass
class Dataset:
    """Image-caption pairs from one source; :meth:`samples` yields them fitted to ``resolution``."""

    source: str
    resolution: int = 64
    crop: str = "center"  # center | random
    flip: bool = False
    skipped: Counter = field(default_factory=Counter)  # reason -> images skipped

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.crop not in ("center", "random"):
            raise PocketdiffError(f"need resolution >= 8 and crop center or random, got {self.resolution}, {self.crop}")

    @property
    def is_shapes(self) -> bool:
        return self.source == "shapes"

    def digest(self) -> str:
        """What identifies the data: the source's files (names, sizes, mtimes) and the fitting settings."""
        h = hashlib.sha256(json.dumps([self.source, self.resolution, self.crop, self.flip]).encode())
        for p in self._files():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def _files(self) -> list[Path]:
        return []

    def _pairs(self, rng: np.random.Generator) -> Iterator[tuple[object, str]]:
        """(PIL image or a reason it could not be read, caption), one pass over the source."""
        raise NotImplementedError

    def samples(self, n: int, seed: int = 0) -> Iterator[tuple[np.ndarray, str]]:
        """``n`` fitted (image, caption) pairs in a seeded order, passing over the source as often as it takes."""
        rng = np.random.default_rng([seed, 0xDA7A])
        done = 0
        while done < n:
            before = done
            for image, text in self._pairs(rng):
                if isinstance(image, str):
                    self.skipped[image] += 1
                    continue
                try:
                    yield fit(image, self.resolution, self.crop, self.flip, rng), text
                except OSError:  # truncated or corrupt past the header
                    self.skipped["unreadable image"] += 1
                    continue
                done += 1
                if done == n:
                    return
            if done == before:
                raise PocketdiffError(f"{self.source}: no readable image-caption pair ({dict(self.skipped)}); "
                                      "check the images and captions")

    def _texts(self, rng: np.random.Generator) -> Iterator[str]:
        """The captions of one pass over the source in a seeded order ("" where a sample has none)."""
        raise NotImplementedError

    def captions(self, n: int, seed: int = 0) -> list[str]:
        """``n`` captions in a seeded order (no image is decoded), passing over the source as often as it takes:
        the prompts of the recipes that learn from a teacher's generations (step, decoder)."""
        rng = np.random.default_rng([seed, 0x7E47])
        out: list[str] = []
        while len(out) < n:
            before = len(out)
            out += [t for t in self._texts(rng) if t][:n - len(out)]
            if len(out) == before:
                raise PocketdiffError(f"{self.source}: no captions; add metadata.jsonl text or .txt files")
        return out


class ShapesData(Dataset):
    """The procedural Shapes stream: renders of fresh training-split scenes (64 px)."""

    def samples(self, n: int, seed: int = 0) -> Iterator[tuple[np.ndarray, str]]:
        from .shapes import sample_batch

        rng = np.random.default_rng([seed, 999])
        for i in range(0, n, 256):
            images, captions, _ = sample_batch(rng, min(256, n - i), split="train")
            yield from zip(images, captions)

    def captions(self, n: int, seed: int = 0) -> list[str]:
        """Captions of ``n`` fresh training-split scenes (no held-out pairs)."""
        from .shapes import caption, sample_scene

        rng = np.random.default_rng([seed, 4242])
        return [caption(sample_scene(rng)) for _ in range(n)]


def _open_image(data: bytes | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError):
        return "unreadable image"


class FolderData(Dataset):
    """An image folder with ``metadata.jsonl`` (imagefolder) or a ``.txt`` caption beside each image."""

    def _index(self) -> list[tuple[Path, str | None]]:
        """(image path, caption or None) rows, read from the folder once per dataset."""
        if getattr(self, "_rows", None) is None:
            self._rows = self._read_index()
        return self._rows

    def _read_index(self) -> list[tuple[Path, str | None]]:
        root = Path(self.source)
        meta = root / "metadata.jsonl"
        if meta.is_file():
            rows = []
            for line in meta.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    rows.append((root / r["file_name"], r.get("text", r.get("caption"))))
            return rows
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").is_file()
                 else None) for p in images]

    def _files(self) -> list[Path]:
        """The images, and the captions' files (metadata.jsonl or the sidecar .txt files)."""
        images = sorted(p for p, _ in self._index() if p.is_file())
        meta = Path(self.source) / "metadata.jsonl"
        captions = [meta] if meta.is_file() else [p.with_suffix(".txt") for p in images if p.with_suffix(".txt").is_file()]
        return images + captions

    def _pairs(self, rng: np.random.Generator) -> Iterator[tuple[object, str]]:
        rows = self._index()
        for i in rng.permutation(len(rows)):
            path, text = rows[i]
            if not text:
                yield "no caption", ""
            elif not path.is_file():
                yield "missing file", ""
            else:
                yield _open_image(path), text

    def _texts(self, rng: np.random.Generator) -> Iterator[str]:
        rows = self._index()
        for i in rng.permutation(len(rows)):
            yield rows[i][1] or ""


def _shard_urls(pattern: str) -> list[str]:
    import braceexpand

    urls = []
    for part in braceexpand.braceexpand(pattern):
        urls += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    return [u for u in urls if os.path.isfile(u)]


def _shard_caption(sample: dict) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", "replace").strip()
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return meta.get("text") or meta.get("caption")
    return None


class ShardData(Dataset):
    """webdataset tar shards, streamed; each pass visits the shards in a seeded order."""

    def _files(self) -> list[Path]:
        return [Path(u) for u in _shard_urls(self.source)]

    def _stream(self, rng: np.random.Generator):
        """The shards' samples (raw bytes by key), the shards in a seeded order."""
        import webdataset as wds

        urls = _shard_urls(self.source)
        order = [urls[i] for i in rng.permutation(len(urls))]
        return wds.WebDataset(order, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)

    def _pairs(self, rng: np.random.Generator) -> Iterator[tuple[object, str]]:
        for sample in self._stream(rng):
            key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
            text = _shard_caption(sample)
            if key is None:
                yield "no image in sample", ""
            elif not text:
                yield "no caption", ""
            else:
                yield _open_image(sample[key]), text

    def _texts(self, rng: np.random.Generator) -> Iterator[str]:
        for sample in self._stream(rng):
            yield _shard_caption(sample) or ""


def open_dataset(source: str = "shapes", resolution: int = 64, crop: str = "center", flip: bool = False) -> Dataset:
    """The dataset of ``source`` ("shapes", a folder, or tar shards), checked to hold something usable now."""
    kw = dict(resolution=resolution, crop=crop, flip=flip)
    if source == "shapes":
        from .shapes import IMAGE_SIZE

        if resolution != IMAGE_SIZE:
            raise PocketdiffError(f"the Shapes stream renders {IMAGE_SIZE} px images; drop --resolution or use 64")
        return ShapesData(source, **kw)
    if Path(source).is_dir():
        data: Dataset = FolderData(source, **kw)
        if not data._index():
            raise PocketdiffError(f"{source}: no images with captions (expected metadata.jsonl, or img.png + img.txt)")
    elif ".tar" in source:
        data = ShardData(source, **kw)
        if not _shard_urls(source):
            raise PocketdiffError(f"{source}: matches no tar shard; give a path, a glob or a {{000..009}} pattern")
    else:
        raise PocketdiffError(f"{source}: not a data source; pass --data shapes, an image folder or tar shards")
    next(data.samples(1), None)  # one usable pair, or a one-line error now
    data.skipped.clear()
    return data
