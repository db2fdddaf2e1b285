"""A domain CLIP for Shapes: a small image/text dual encoder trained contrastively (Radford et al. 2021).

It stands in for the papers' CLIP ViT-g: its cosine similarity between an image and a prompt is the CLIP
score, and its pooled image features are the feature space of the Frechet distance (``eval/frechet.py``,
the stand-in for FID's Inception pool3). It is trained separately from any generator's text encoder.

- Image tower: a small CNN (stride-2 stages, GroupNorm, SiLU) on 64 x 64 RGB in [-1, 1], pooled to one
  vector by CLIP's ResNet attention pooling (a learned positional embedding keeps *where* things are,
  which captions name; global average pooling would discard it), then a linear projection.
- Text tower: a transformers ``CLIPTextModel`` over the Shapes tokenizer; its pooled (end-of-text)
  output goes through a linear projection.
- Both embeddings are L2-normalised; logits are cosines times a learned temperature (init 1/0.07,
  clamped at 100), as in CLIP.

Recipe: symmetric InfoNCE with *hard negatives*: every image also gets its caption with one attribute
changed (colour, shape, size, position or background) as an extra negative text, so the image-to-text
logits are (B, 2B). Without them a batch of random scenes rarely holds two captions that differ in one
word, and the score would not tell a correct generation from a near miss.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import PALETTE, POSITIONS, SHAPES, SIZES, Scene, caption, sample_batch
from ..errors import ModelFolderError

CORRUPTIONS = ("colour", "shape", "size", "position", "background")


@dataclass
class ClipConfig:
    image_channels: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 stage each: 64 -> 32 -> 16 -> 8 -> 4 px
    stem_channels: int = 0  # >0: a full-resolution 3x3 conv before the stages (costs ~25% of the image tower)
    norm_groups: int = 8  # GroupNorm groups; must divide every channel count
    pool: str = "attention"  # "attention" (CLIP ResNet's AttentionPool2d) | "mean" (global average)
    pool_heads: int = 4  # heads of the attention pool
    embed_dim: int = 128  # shared embedding space
    text_hidden: int = 128  # text transformer width
    text_layers: int = 3  # text transformer layers
    text_heads: int = 4  # text transformer heads
    text_intermediate: int = 512  # text transformer MLP width
    max_length: int = 32  # tokens, with BOS/EOS (the longest Shapes caption is exactly 32)
    logit_scale_init: float = math.log(1 / 0.07)  # initial log temperature (CLIP's 1/0.07)
    logit_scale_max: float = 100.0  # the temperature's cap, as in CLIP
    image_size: int = 64  # input resolution, px

    def __post_init__(self) -> None:
        self.image_channels = tuple(int(c) for c in self.image_channels)
        chans = ((self.stem_channels,) if self.stem_channels else ()) + self.image_channels
        if not self.image_channels or any(c % self.norm_groups for c in chans):
            raise ValueError(f"norm_groups={self.norm_groups} must divide every channel count {chans}")
        if self.pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean', got {self.pool!r}")
        if self.pool == "attention" and self.image_channels[-1] % self.pool_heads:
            raise ValueError(f"pool_heads={self.pool_heads} must divide {self.image_channels[-1]}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_heads={self.text_heads} must divide text_hidden={self.text_hidden}")
        if self.image_size % 2 ** len(self.image_channels):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**{len(self.image_channels)}")

    @property
    def feature_dim(self) -> int:
        return self.image_channels[-1]

    @property
    def grid(self) -> int:
        """Side of the last feature map."""
        return self.image_size // 2 ** len(self.image_channels)

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ClipConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def _conv(cin: int, cout: int, groups: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(groups, cout), nn.SiLU()]


def image_trunk(cfg: ClipConfig) -> nn.Sequential:
    """(B, 3, S, S) -> (B, C, S / 2^n, S / 2^n): [stem conv], then per stage a stride-2 conv and a conv.

    A 3x3 stride-2 conv still sees every input pixel, so the first stage loses no detail.
    """
    layers = _conv(3, cfg.stem_channels, cfg.norm_groups) if cfg.stem_channels else []
    prev = cfg.stem_channels or 3
    for c in cfg.image_channels:
        layers += _conv(prev, c, cfg.norm_groups, stride=2) + _conv(c, c, cfg.norm_groups)
        prev = c
    return nn.Sequential(*layers)


class AttentionPool2d(nn.Module):
    """CLIP's ResNet pooling: the mean token, plus a learned positional embedding, attends over the map."""

    def __init__(self, grid: int, dim: int, heads: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos  # (B, 1 + HW, C)
        out, _ = self.attn(x[:, :1], x, x, need_weights=False)  # (B, 1, C)
        return out[:, 0]  # (B, C)


class DomainCLIP(nn.Module):
    """Image and text towers into one normalised embedding space; see the module docstring."""

    def __init__(self, cfg: ClipConfig | None = None, tokenizer=None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        from ..text.tokenizer import shapes_tokenizer

        self.cfg = cfg = cfg or ClipConfig()
        self.tokenizer = tokenizer if tokenizer is not None else shapes_tokenizer(cfg.max_length)
        self.trunk = image_trunk(cfg)
        self.pool = AttentionPool2d(cfg.grid, cfg.feature_dim, cfg.pool_heads) if cfg.pool == "attention" else None
        self.image_proj = nn.Linear(cfg.feature_dim, cfg.embed_dim, bias=False)
        tok = self.tokenizer
        text_cfg = CLIPTextConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_length, hidden_act="quick_gelu")
        self.text = CLIPTextModel(text_cfg)
        self.text_proj = nn.Linear(cfg.text_hidden, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))

    # ---- towers -----------------------------------------------------------------------------------
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, F) pooled image features before the projection (FD space)."""
        x = self.trunk(pixels)  # (B, C, g, g)
        return self.pool(x) if self.pool is not None else x.mean(dim=(2, 3))  # (B, C)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, E), unit norm."""
        return F.normalize(self.image_proj(self.features(pixels)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, E), unit norm (pooled at the first end-of-text token)."""
        pooled = self.text(input_ids=input_ids).pooler_output  # (B, D)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit temperature exp(t), clamped at logit_scale_max (CLIP)."""
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor):
        """-> (image embeddings (B, E), text embeddings (T, E), logit scale): one call, for DDP."""
        return self.encode_image(pixels), self.encode_text(input_ids), self.scale()

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, L) ids, padded to the longest (the pooled token is the first EOS, so padding is inert)."""
        return self.tokenizer(list(captions), padding="longest", max_length=self.cfg.max_length, truncation=True,
                              return_tensors="pt").input_ids

    # ---- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, 64, 64, 3) or a list of PIL images -> (N, F) float64 features, for the Frechet distance."""
        pixels = _as_pixels(images)
        dev = self.logit_scale.device
        out = [self.features(pixels[i:i + batch_size].to(dev)).double().cpu() for i in range(0, len(pixels), batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def score(self, images, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """Cosine similarity of each image with its caption: uint8 (B, 64, 64, 3) or PIL list -> (B,).

        The papers' "CLIP score" is 100 * max(cos, 0) of the same quantity.
        """
        pixels = _as_pixels(images)
        if len(pixels) != len(captions):
            raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
        dev = self.logit_scale.device
        out = []
        for i in range(0, len(pixels), batch_size):
            img = self.encode_image(pixels[i:i + batch_size].to(dev))
            txt = self.encode_text(self.tokenize(captions[i:i + batch_size]).to(dev))
            out.append((img * txt).sum(-1).float().cpu())
        return torch.cat(out)

    # ---- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` into ``folder``."""
        from safetensors.torch import save_file

        from ..text.tokenizer import save_tokenizer

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.cfg)
        cfg["image_channels"] = list(cfg["image_channels"])
        (out / "config.json").write_text(json.dumps({"class": "DomainCLIP", **cfg}, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        save_tokenizer(self.tokenizer, out / "tokenizer")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> "DomainCLIP":
        """Load a folder written by :meth:`save` (safetensors only); a bad folder raises ModelFolderError."""
        from ..folder import load_state_dict, load_tokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no such DomainCLIP folder; train one with train_clip or pass its path")
        path = folder / "config.json"
        if not path.is_file():
            raise ModelFolderError(f"{path}: missing; the folder is not a saved DomainCLIP")
        try:
            raw = json.loads(path.read_text())
            raw.pop("class", None)
            cfg = ClipConfig.from_dict(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            raise ModelFolderError(f"{path}: not a valid DomainCLIP config ({str(e).splitlines()[0][:100]})") from None
        tokenizer = load_tokenizer(folder / "tokenizer")
        state = load_state_dict(folder, "model")  # ModelFolderError if missing or corrupt; never unpickles
        model = cls(cfg, tokenizer)
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            k = (wrong or missing or unexpected)[0]
            raise ModelFolderError(f"{folder / 'model.safetensors'} does not match config.json ({len(missing)} missing, "
                                   f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors, e.g. {k}); "
                                   "re-save the model")
        model.load_state_dict(state)
        return model.eval()


def _as_pixels(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) array/tensor or a list of PIL images / arrays -> (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---- hard negatives ---------------------------------------------------------------------------------
def corrupt(scene: Scene, rng: np.random.Generator, attribute: str | None = None) -> Scene:
    """The scene with exactly one attribute changed (its caption is a hard negative).

    colour / shape / size / position change one random object (position: to an empty cell); background
    changes to another colour that no object has, so every corrupted scene is still a valid scene.
    """
    attribute = attribute or CORRUPTIONS[rng.integers(len(CORRUPTIONS))]
    objects = list(scene.objects)
    if attribute == "background":
        used = {o.colour for o in objects} | {scene.background}
        options = [c for c in PALETTE if c not in used]
        return Scene(scene.objects, options[rng.integers(len(options))])
    i = int(rng.integers(len(objects)))
    o = objects[i]
    if attribute == "colour":
        options = [c for c in PALETTE if c not in (o.colour, scene.background)]
        objects[i] = replace(o, colour=options[rng.integers(len(options))])
    elif attribute == "shape":
        options = [s for s in SHAPES if s != o.shape]
        objects[i] = replace(o, shape=options[rng.integers(len(options))])
    elif attribute == "size":
        objects[i] = replace(o, size=next(s for s in SIZES if s != o.size))
    elif attribute == "position":
        taken = {p.cell for p in objects}
        options = [c for c in range(len(POSITIONS)) if c not in taken]
        objects[i] = replace(o, cell=int(options[rng.integers(len(options))]))
    else:
        raise ValueError(f"attribute must be one of {CORRUPTIONS}, got {attribute!r}")
    return Scene(tuple(sorted(objects, key=lambda p: p.cell)), scene.background)


@torch.no_grad()
def clip_quality(model: DomainCLIP, n: int = 256, seed: int = 2024, split: str = "all") -> dict:
    """Image -> text top-1 retrieval among ``n`` fresh captions, and how often the true caption scores
    above each single-attribute corruption of it (overall and per attribute)."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng([seed, 0xE7A1])
    images, captions, scenes = sample_batch(rng, n, split=split)
    dev = model.logit_scale.device
    img = torch.cat([model.encode_image(_as_pixels(images[i:i + 256]).to(dev)) for i in range(0, n, 256)])
    txt = torch.cat([model.encode_text(model.tokenize(captions[i:i + 256]).to(dev)) for i in range(0, n, 256)])
    sims = img @ txt.t()  # (n, n)
    true = sims.diagonal()  # (n,)
    out = {"retrieval_top1": float((sims.argmax(dim=1) == torch.arange(n, device=dev)).float().mean())}
    beats = []
    for attr in CORRUPTIONS:
        neg = [caption(corrupt(s, rng, attr)) for s in scenes]
        neg_txt = torch.cat([model.encode_text(model.tokenize(neg[i:i + 256]).to(dev)) for i in range(0, n, 256)])
        b = (true > (img * neg_txt).sum(-1)).float()
        out[f"beats_{attr}"] = float(b.mean())
        beats.append(b)
    out["beats_corruption"] = float(torch.stack(beats).mean())
    out["mean_cosine"] = float(true.mean())
    model.train(was_training)
    return out


def load_domain_clip(folder: str | Path | None = None) -> "DomainCLIP | None":
    """A domain-CLIP folder or shipped component name; by default the shipped ``shapes-clip``, else None."""
    from ..models.components import resolve_component, shipped_components

    folder = folder or shipped_components().get("shapes-clip")
    return DomainCLIP.load(resolve_component(folder)) if folder else None
