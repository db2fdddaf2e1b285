"""Real-world quality metrics for any model on any prompts: FID, IS and CLIP score, from local weights only.

- **FID** (Heusel et al. 2017): the Frechet distance (``eval/frechet.py``) between Gaussians fitted to the FID
  Inception's pool features (``eval/inception.py``) of the generated images and of a reference image folder;
  both sets resized to 299 px the same way (clean-fid's advice). With few images it is biased upwards: compare
  numbers at the same N only.
- **IS** (Salimans et al. 2016) of the generated images, from the same network's logits (10 splits).
- **CLIP score** (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(image, prompt), 0), averaged,
  with a transformers CLIP folder (``CLIPModel`` + its tokenizer and image processor, safetensors weights).

Nothing is downloaded: each metric needs its file or folder, and says which when it is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import PocketdiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise PocketdiffError(f"{path}: no such prompts file (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise PocketdiffError(f"{path}: holds no prompt (one prompt per line)")
    return prompts


def reference_images(folder: str | Path, limit: int | None = None) -> list:
    """The readable images below ``folder`` (sorted by path), as RGB PIL images."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise PocketdiffError(f"{folder}: no such reference folder (a folder of .png/.jpg/.webp images)")
    images = []
    for p in sorted(q for q in folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            continue
        if limit and len(images) == limit:
            break
    if len(images) < 2:
        raise PocketdiffError(f"{folder}: FID needs at least 2 readable reference images, found {len(images)}")
    return images


class HFClip:
    """CLIP score with a local transformers CLIP folder (``config.json`` of model_type "clip")."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        folder = Path(folder)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def score(self, images, prompts: list[str], batch_size: int = 32) -> np.ndarray:
        """Per-pair 100 * max(cos, 0) of each image and its prompt."""
        out = []
        max_len = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(prompts), batch_size):
            pix = self.processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
            ids = self.tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                                 return_tensors="pt")
            img = _embedding(self.model.get_image_features(pixel_values=pix))
            txt = _embedding(self.model.get_text_features(**ids))
            out.append((100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)).numpy())
        return np.concatenate(out)


def _embedding(out) -> torch.Tensor:
    """A projected embedding tensor from get_*_features (a tensor, or an output object in newer transformers)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def is_transformers_clip(folder: str | Path | None) -> bool:
    """True for a folder holding a transformers CLIP model's config (not pocketdiff's domain CLIP)."""
    cfg = Path(folder) / "config.json" if folder else None
    if cfg is None or not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "clip"
    except json.JSONDecodeError:
        return False


def realworld_metrics(images: list, prompts: list[str], *, reference=None, inception=None, clip=None) -> dict:
    """FID against ``reference`` images and IS (with ``inception``, a loaded FIDInceptionV3), CLIP score (with
    ``clip``, an :class:`HFClip`) of generated ``images`` (uint8 arrays or PIL images) for ``prompts``."""
    from .frechet import frechet_distance_features
    from .inception import inception_outputs, inception_score

    r: dict = {"n": len(images)}
    if inception is not None:
        feats, logits = inception_outputs(inception, images)
        r["is"], r["is_std"] = inception_score(logits)
        if reference is not None:
            ref, _ = inception_outputs(inception, reference)
            r["fid"], r["n_reference"] = frechet_distance_features(feats, ref), len(reference)
    if clip is not None:
        r["clip_score"] = float(clip.score(images, prompts).mean())
    return r


def generate_for_prompts(pipe, prompts: list[str], *, steps: int, sampler: str, guidance: float, seed: int = 0,
                         batch_size: int = 8, progress: bool = True) -> tuple[list[np.ndarray], float]:
    """One image per prompt at the model's default size (prompt i with seed + i's batch), and seconds per image."""
    import time

    from tqdm import tqdm

    images, seconds = [], 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress):
        t0 = time.perf_counter()
        out = pipe(prompts[i:i + batch_size], steps=steps, sampler=sampler, guidance=guidance, seed=seed + i)
        seconds += time.perf_counter() - t0
        images += [np.asarray(im) for im in out.images]
    return images, seconds / len(prompts)
