"""Stochastic block skipping (SnapFusion's robust training) and block removal at evaluation time.

SnapFusion (Li et al. 2023, sec. 3.2) trains the UNet with each cross-attention and ResNet block skipped at
random ("stochastic forward propagation"), so that one trained network can then be evaluated with any subset of
those blocks removed, without retraining, and an architecture search can score removals cheaply.

A *skipped* block outputs what it would output if its residual branch were zero:

- a ``Transformer2DModel`` (self- and cross-attention + feed-forward, with its own residual around them) returns
  its input unchanged;
- a ``ResnetBlock2D`` returns its shortcut: the input, or the 1x1 ``conv_shortcut`` where the block changes the
  channel count (that projection has no identity to fall back on), divided by ``output_scale_factor``.

Skipping patches the block's ``forward`` on the instance (no wrapper module: state-dict keys stay as they are,
so checkpoints, EMA and exports do not see it) and computes nothing for a skipped block.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterable

import numpy as np
import torch

KINDS = {"attention": "Transformer2DModel", "resnet": "ResnetBlock2D"}


def skippable_blocks(model: torch.nn.Module, kinds: str = "all", trained_only: bool = False
                     ) -> dict[str, torch.nn.Module]:
    """Qualified name -> block, for every ResNet and transformer block inside the UNets of ``model`` (in module
    order). ``kinds``: "all", "attention", "resnet", or a comma-separated list of name prefixes. ``trained_only``:
    only UNets with a parameter that requires grad (not a frozen KD teacher held in the same model)."""
    from diffusers import UNet2DConditionModel

    wanted = set(KINDS.values()) if kinds in ("all", "") else {KINDS[kinds]} if kinds in KINDS else None
    prefixes = None if wanted is not None else [p.strip() for p in kinds.split(",") if p.strip()]
    out = {}
    for root_name, root in model.named_modules():
        if not isinstance(root, UNet2DConditionModel):
            continue
        if trained_only and not any(p.requires_grad for p in root.parameters()):
            continue
        for name, module in root.named_modules():
            full = f"{root_name}.{name}" if root_name else name
            if type(module).__name__ not in KINDS.values() or getattr(module, "_pocketdiff_removed", False):
                continue  # a block removed for good (models.surgery) is neither skipped nor restored
            if (wanted is not None and type(module).__name__ in wanted) or \
                    (prefixes is not None and any(full.startswith(p) for p in prefixes)):
                out[full] = module
    return out


def _skipped_resnet(self, input_tensor, temb=None, *args, **kwargs):
    x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return x / self.output_scale_factor


def _skipped_transformer(self, hidden_states, *args, return_dict: bool = True, **kwargs):
    if return_dict:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=hidden_states)
    return (hidden_states,)


def set_skipped(blocks: dict[str, torch.nn.Module], skipped: Iterable[str]) -> None:
    """Skip exactly the blocks named in ``skipped`` (the others run as built)."""
    skipped = set(skipped)
    unknown = skipped - set(blocks)
    if unknown:
        raise KeyError(f"no such skippable block(s): {sorted(unknown)[:3]}")
    for name, module in blocks.items():
        module.__dict__.pop("forward", None)  # back to the class's forward
        if name in skipped:
            fn = _skipped_resnet if type(module).__name__ == "ResnetBlock2D" else _skipped_transformer
            module.forward = types.MethodType(fn, module)


@contextlib.contextmanager
def removed(model: torch.nn.Module, names: Iterable[str]):
    """Evaluate ``model`` with the blocks ``names`` removed (skipped), restoring them afterwards."""
    blocks = skippable_blocks(model)
    set_skipped(blocks, names)
    try:
        yield model
    finally:
        set_skipped(blocks, ())


class StochasticSkipper:
    """Per training step, skip each of ``blocks`` with probability ``p``: a pure function of (seed, step), so a
    resumed run skips what the uninterrupted one would have."""

    def __init__(self, model: torch.nn.Module, p: float, kinds: str = "all", seed: int = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"skip probability must be in [0, 1), got {p}")
        self.blocks = skippable_blocks(model, kinds, trained_only=True) if p > 0 else {}
        self.p, self.seed = p, seed
        self.always: set[str] = set()  # blocks skipped at every step (a search's removed blocks), of self.blocks
        if p > 0 and not self.blocks:
            raise ValueError(f"block skipping: no {kinds!r} blocks in the trained model's UNet")

    def draw(self, step: int) -> list[str]:
        rng = np.random.default_rng([self.seed, 0x5C1B, step])
        drawn = [name for name in self.blocks if rng.random() < self.p]  # one draw per block: same stream always
        return sorted(set(drawn) | self.always)

    @contextlib.contextmanager
    def step(self, step: int):
        set_skipped(self.blocks, self.draw(step) if self.p > 0 else ())
        try:
            yield
        finally:
            set_skipped(self.blocks, ())
