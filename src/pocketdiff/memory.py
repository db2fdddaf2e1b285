"""How much memory a generation will need, checked against what the machine has before any work starts.

The estimate is the VAE decoder's widest activation at full resolution (its first block's channels times the
image's pixels, float32, about three such tensors alive at once), which dominates a Stable-Diffusion-class
generation's peak from a few hundred pixels up; with ``--vae-tile`` only one tile (and its halo) is decoded at a
time. It is a floor, not a bound: a size it refuses cannot run here, a size it accepts may still be slow.
"""

from __future__ import annotations

import os

from .errors import PocketdiffError

LIVE_TENSORS = 3  # a conv's input, output and the GroupNorm in between
HALO = 6  # latent pixels of context around a VAE tile (tiling.tiled_decode's default)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: accept


def decode_bytes(vae_channels: int, height: int, width: int, batch: int = 1, tile_latent: int | None = None,
                 scale_factor: int = 8) -> int:
    """Bytes of the decoder's full-resolution activations for a (batch, height, width) decode."""
    pixels = height * width
    if tile_latent:
        side = (tile_latent + 2 * HALO) * scale_factor
        pixels = min(pixels, side * side)
    return LIVE_TENSORS * vae_channels * pixels * 4 * batch


def unet_bytes(channels: int, latent_height: int, latent_width: int, batch: int = 1) -> int:
    """Bytes of a UNet's widest activations at latent resolution (its first stage's channels)."""
    return LIVE_TENSORS * channels * latent_height * latent_width * 4 * batch


def check_fits(needed: int, what: str, fix: str) -> None:
    """A one-line error when ``needed`` bytes exceed the memory available now."""
    have = available_bytes()
    if needed > have:
        raise PocketdiffError(f"{what} needs about {needed / 2**30:,.1f} GB of memory, more than the "
                              f"{have / 2**30:,.1f} GB available; {fix}")
