"""Blocks removed from a UNet for good: what an architecture search outputs (SnapFusion's evolved UNet).

A removed block (a ``ResnetBlock2D`` or a ``Transformer2DModel`` named as in the UNet's ``named_modules``) stays in
the module tree and in the state dict, every weight zero but a ResNet's 1x1 shortcut (so the layer that ends its
residual branch, a ResNet's ``conv2`` or a transformer's ``proj_out``, gives 0). So any loader computes exactly
what the removal means:

* stock diffusers (``UNet2DConditionModel.from_pretrained``) builds the block, loads the zeros and computes a zero
  residual: the same output as pocketdiff, at the full UNet's cost (it warns that it ignores the config key);
* pocketdiff reads the config key ``pocketdiff_removed_blocks`` (:data:`REMOVED_KEY`) and patches each block's
  ``forward`` to its skipped form (:mod:`pocketdiff.blocks.skipping`: the input, or a ResNet's 1x1 shortcut over
  ``output_scale_factor``), so the block computes nothing: the saving is real in torch, in traced graphs and in
  the ONNX export (exporters trace the patched forward).

A removed block is frozen (no gradient reaches it, and training keeps its zeros), and stochastic skipping leaves
it alone. What diffusers' config cannot say, this key says: removing one ResNet of a block changes neither the
block's type nor ``layers_per_block`` (whose count also sets the skip connections of the up path), so such a
removal is expressible only by this key; the file keeps the removed blocks' tensors, as zeros.
"""

from __future__ import annotations

import types
from typing import Iterable

import torch

REMOVED_KEY = "pocketdiff_removed_blocks"


def removed_names(unet: torch.nn.Module) -> list[str]:
    """The blocks removed from ``unet`` (its config key; empty for a plain UNet)."""
    return list(getattr(unet, "config", {}).get(REMOVED_KEY, None) or [])


def is_removed(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "_pocketdiff_removed", False))


@torch.no_grad()
def _zero_residual(block: torch.nn.Module) -> None:
    """Zero every weight of the block but a ResNet's kept 1x1 shortcut: its residual branch then computes 0 in any
    loader, and the zeros cost next to nothing once compressed (git, archives)."""
    shortcut = getattr(block, "conv_shortcut", None)
    keep = {id(p) for p in shortcut.parameters()} if shortcut is not None else set()
    for tensor in list(block.parameters()) + list(block.buffers()):
        if id(tensor) not in keep and tensor.is_floating_point():  # (an int8 layer is never run)
            tensor.zero_()


def remove_blocks(unet: torch.nn.Module, names: Iterable[str]) -> torch.nn.Module:
    """Remove the named ResNet / transformer blocks of ``unet`` for good (in place; returns it); the config key
    lists every removed block, so ``save_pretrained`` records them. Unknown names raise ``KeyError``."""
    from .skipping import KINDS, _skipped_resnet, _skipped_transformer

    names = sorted(set(names) | set(removed_names(unet)))
    modules = dict(unet.named_modules())
    bad = [n for n in names if n not in modules or type(modules[n]).__name__ not in KINDS.values()]
    if bad:
        raise KeyError(f"not a ResNet or transformer block of this UNet: {bad[0]}")
    for name in names:
        block = modules[name]
        _zero_residual(block)
        block.requires_grad_(False)
        block._pocketdiff_removed = True
        fn = _skipped_resnet if type(block).__name__ == "ResnetBlock2D" else _skipped_transformer
        block.forward = types.MethodType(fn, block)
    unet.register_to_config(**{REMOVED_KEY: names})
    return unet


def make_trainable(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` in training mode with every parameter trainable except those of its removed blocks."""
    unet.train().requires_grad_(True)
    for m in unet.modules():
        if is_removed(m):
            m.requires_grad_(False)
    return unet


def apply_config(unet: torch.nn.Module, config: dict) -> torch.nn.Module:
    """Apply a saved config's removals to a UNet built (and loaded) from it: the loader's hook."""
    names = config.get(REMOVED_KEY) or []
    return remove_blocks(unet, names) if names else unet


def count_active_params(unet: torch.nn.Module, also_removed: Iterable[str] = ()) -> int:
    """Parameters the UNet computes with: removed blocks (and ``also_removed``, e.g. skipped ones) excluded, a
    ResNet's kept 1x1 shortcut included."""
    extra = set(also_removed)
    total = sum(p.numel() for p in unet.parameters())
    for name, m in unet.named_modules():
        if is_removed(m) or name in extra:
            total -= sum(p.numel() for p in m.parameters())
            shortcut = getattr(m, "conv_shortcut", None)
            if shortcut is not None:
                total += sum(p.numel() for p in shortcut.parameters())
    return total
