"""Captioners and image-text agreement scorers for ``pocketdiff data curate`` (pluggable: any callable fits).

* ``shapes``: the analytic Shapes captioner, :func:`pocketdiff.eval.checker.describe` read back into the caption
  grammar (on 64 px renders it returns the true caption);
* a local transformers image-to-text folder (BLIP, GIT, a VisionEncoderDecoder, ...): ``AutoProcessor`` +
  ``AutoModelForVision2Seq`` (or ``AutoModelForImageTextToText``) from the folder only (``local_files_only``),
  greedy decoding;
* scorers: the domain CLIP (``shapes``, or a domain-CLIP folder) gives the cosine similarity; a transformers CLIP
  folder gives the CLIP score 100 * max(cos, 0) (:class:`pocketdiff.eval.realworld.HFClip`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PocketdiffError


def shapes_captioner(images: list[np.ndarray]) -> list[str]:
    from PIL import Image

    from ..data.datasets import fit
    from ..data.shapes import IMAGE_SIZE, caption
    from .checker import describe

    out = []
    for im in images:
        if im.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            im = fit(Image.fromarray(im), IMAGE_SIZE)
        scene = describe(im)
        out.append(caption(scene) if scene.objects else "")
    return out


class HFCaptioner:
    """A local transformers image-to-text model folder as a captioner."""

    def __init__(self, folder: str | Path, max_new_tokens: int = 30):
        import transformers

        folder = Path(folder)
        self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        cls = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText
        self.model = cls.from_pretrained(folder, local_files_only=True).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        import torch
        from PIL import Image

        inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


def make_captioner(spec: str):
    """"" (none), "shapes", or a local image-to-text model folder."""
    if not spec:
        return None
    if spec == "shapes":
        return shapes_captioner
    if not (Path(spec) / "config.json").is_file():
        raise PocketdiffError(f"{spec}: not a captioning model folder (no config.json); pass --captioner shapes or "
                              "a local transformers image-to-text folder")
    return HFCaptioner(spec)


def make_scorer(spec: str):
    """"" (none), "shapes" (the shipped domain CLIP), a domain-CLIP folder, or a transformers CLIP folder."""
    if not spec:
        return None
    from .realworld import HFClip, is_transformers_clip

    if spec != "shapes" and is_transformers_clip(spec):
        clip = HFClip(spec)
        return lambda images, captions: clip.score(images, captions)
    from .clip import load_domain_clip

    clip = load_domain_clip(None if spec == "shapes" else spec)
    if clip is None:
        raise PocketdiffError(f"{spec}: no domain CLIP found; pass a CLIP folder")
    def score(images, captions):
        from PIL import Image

        from ..data.datasets import fit
        from ..data.shapes import IMAGE_SIZE

        images = [im if im.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else fit(Image.fromarray(im), IMAGE_SIZE)
                  for im in images]
        return clip.score(np.stack(images), captions).numpy()

    return score
