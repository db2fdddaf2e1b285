"""Generated images as files and bytes, with their generation parameters embedded (``generate`` and ``serve``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_metadata(prompt: str, negative_prompt: str | None, seed: int, chosen, model: str, image) -> dict:
    """The fields every written image carries: prompt, seed, sampling settings (``chosen``: SamplingSettings),
    model, size and pocketdiff's version."""
    from .version import __version__

    return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": chosen.steps,
            "sampler": chosen.sampler, "guidance": chosen.guidance, "model": model, "width": image.width,
            "height": image.height, "generator": f"pocketdiff {__version__}"}


def write_image(image, out, fmt: str, meta: dict) -> None:
    """``image`` in ``fmt`` (PNG, JPEG or WEBP) to the file object ``out``, with ``meta``: PNG text chunks (one per
    field, plus all of them as JSON in "parameters"), the JPEG comment, WebP's EXIF ImageDescription."""
    from PIL import Image, PngImagePlugin

    params = json.dumps(meta)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in meta.items():
            info.add_text(k, "" if v is None else str(v))
        info.add_text("parameters", params)
        image.save(out, format="PNG", pnginfo=info)
    elif fmt == "JPEG":
        image.save(out, format="JPEG", quality=95, comment=params.encode())
    else:
        exif = Image.Exif()
        exif[270] = params  # ImageDescription
        image.save(out, format="WEBP", quality=95, exif=exif.tobytes())


def png_bytes(image, meta: dict) -> bytes:
    """The PNG file of ``image`` with ``meta``, in memory."""
    buf = io.BytesIO()
    write_image(image, buf, "PNG", meta)
    return buf.getvalue()


def save_image(image, path: Path, meta: dict) -> None:
    """Write atomically (temp file + rename) in the format of the path's extension (PNG otherwise), with ``meta``."""
    from .files import atomic_file

    with atomic_file(path) as tmp:
        write_image(image, tmp, IMAGE_FORMATS.get(Path(path).suffix.lower(), "PNG"), meta)
