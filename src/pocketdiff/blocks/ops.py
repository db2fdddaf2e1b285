"""MobileDiffusion's block operations (Zhao et al. 2023, sec. 3) as UNet surgery on a diffusers UNet.

Each operation rewrites the modules of the blocks whose names start with one of its ``blocks`` prefixes (default:
all), carrying weights over where the new module can use them:

* ``separable``: each 3x3 convolution of a ResNet block becomes a depthwise 3x3 + pointwise 1x1 pair; carried over
  as the best rank-1 factorisation, per input channel, of the full kernel (its (C_out, 9) slice by SVD);
* ``shared_kv``: self-attention computes its values with its key projection (``to_v`` is removed; the keys'
  weights are kept). Applied to self-attention only: cross-attention's keys and values come from the text;
* ``swish_ff``: the feed-forward's GEGLU gate uses swish (SiLU) instead of GELU (same weights);
* ``relu_attention``: softmax(QK^T / sqrt(d)) becomes relu(QK^T / sqrt(d)) / L (L: the number of keys; Wortsman
  et al. 2023), in self- and cross-attention; fine-tune after it;
* ``trim_ff`` (``ratio``): the feed-forward's inner width cut to ``ratio`` of itself, keeping the units with the
  largest |w_in| x |w_out| product;
* ``cross_only``: the transformer block's first attention (self-attention; a cross-attention in diffusers'
  ``only_cross_attention`` blocks) is removed, leaving one cross-attention and the feed-forward.

A UNet with operations lists them in its config (:data:`OPS_KEY`, in order). The folder loader applies them to the
freshly built UNet before its weights load (the shapes of ``separable`` and ``trim_ff`` follow), and a saved
config names its block types ``pocketdiff:<type>``, so stock diffusers stops at building the UNet with
"pocketdiff:CrossAttnDownBlock2D does not exist" instead of loading a different function silently.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

OPS_KEY = "pocketdiff_ops"
OPS = ("separable", "shared_kv", "swish_ff", "relu_attention", "trim_ff", "cross_only")
TYPE_PREFIX = "pocketdiff:"


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (groups = C_in) then pointwise 1x1, standing in for a dense 3x3 convolution."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, kernel_size, padding=padding, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    @torch.no_grad()
    def carry(self, conv: nn.Conv2d) -> None:
        w = conv.weight.float()  # (C_out, C_in, k, k)
        cout, cin, k, _ = w.shape
        per_input = w.permute(1, 0, 2, 3).reshape(cin, cout, k * k)  # (C_in, C_out, k*k)
        u, s, vh = torch.linalg.svd(per_input, full_matrices=False)  # rank-1 per input channel
        self.pointwise.weight.copy_((u[:, :, 0] * s[:, :1]).T.reshape(cout, cin, 1, 1))
        self.depthwise.weight.copy_(vh[:, 0, :].reshape(cin, 1, k, k))
        if conv.bias is not None:
            self.pointwise.bias.copy_(conv.bias)
        else:
            self.pointwise.bias.zero_()


class GatedSwish(nn.Module):
    """GEGLU with swish: ``proj`` (dim -> 2 x inner) split into value and gate, value * silu(gate)."""

    def __init__(self, dim_in: int, inner: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * inner, bias=bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * nn.functional.silu(gate)


class NoAttention(nn.Module):
    """A removed attention: a zero residual (the block's ``x + attn(norm(x))`` keeps ``x``)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class PocketAttnProcessor:
    """Scaled dot-product attention with MobileDiffusion's variants: ``relu`` (relu(scores) / L in place of the
    softmax) and ``shared_kv`` (values through the key projection)."""

    def __init__(self, relu: bool = False, shared_kv: bool = False):
        self.relu, self.shared_kv = relu, shared_kv

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k = attn.to_q(hidden_states), attn.to_k(context)
        v = k if self.shared_kv else attn.to_v(context)
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if self.relu:
            scores = q @ k.transpose(-1, -2) * attn.scale
            out = torch.relu(scores) @ v / k.shape[-2]
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _selected(unet: nn.Module, blocks, cls_name: str) -> list[tuple[str, nn.Module]]:
    prefixes = None if blocks in (None, "all") else list(blocks)
    return [(n, m) for n, m in unet.named_modules() if type(m).__name__ == cls_name
            and (prefixes is None or any(n.startswith(p) for p in prefixes))]


def _processor(attn) -> PocketAttnProcessor:
    proc = attn.processor if isinstance(attn.processor, PocketAttnProcessor) else PocketAttnProcessor()
    attn.set_processor(proc)
    return proc


def _separable(unet, spec, carry: bool) -> None:
    for _, block in _selected(unet, spec.get("blocks"), "ResnetBlock2D"):
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            new = SeparableConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.padding[0])
            if carry:
                new.carry(conv)
            setattr(block, name, new.to(conv.weight.device))


def _attention_op(unet, spec, carry: bool) -> None:
    for _, block in _selected(unet, spec.get("blocks"), "BasicTransformerBlock"):
        attns = [block.attn1] + ([block.attn2] if getattr(block, "attn2", None) is not None else [])
        if spec["op"] == "relu_attention":
            for attn in attns:
                if not isinstance(attn, NoAttention):
                    _processor(attn).relu = True
        elif not isinstance(block.attn1, NoAttention) and not block.only_cross_attention:  # shared_kv: self only
            proc = _processor(block.attn1)
            proc.shared_kv = True
            block.attn1.to_v = None


def _new_activation(act: nn.Module, keep: int, swish: bool) -> nn.Module:
    """A feed-forward input layer of inner width ``keep``: swish-gated, or the same kind as ``act``."""
    from diffusers.models.activations import GEGLU, GELU

    dim_in, bias = act.proj.in_features, act.proj.bias is not None
    if swish or isinstance(act, GatedSwish):
        if not (swish and isinstance(act, GatedSwish)) and not isinstance(act, (GEGLU, GatedSwish)):
            raise ValueError(f"swish_ff needs a gated (GEGLU) feed-forward, got {type(act).__name__}")
        return GatedSwish(dim_in, keep, bias=bias)
    if isinstance(act, GEGLU):
        return GEGLU(dim_in, keep, bias=bias)
    if isinstance(act, GELU):
        return GELU(dim_in, keep, approximate=act.approximate, bias=bias)
    raise ValueError(f"trim_ff: unsupported feed-forward activation {type(act).__name__}")


def _feed_forward(unet, spec, carry: bool) -> None:
    for _, block in _selected(unet, spec.get("blocks"), "BasicTransformerBlock"):
        ff = block.ff
        act, out = ff.net[0], ff.net[2]
        inner = out.in_features
        keep = inner if spec["op"] == "swish_ff" else max(1, int(round(inner * float(spec.get("ratio", 0.5)))))
        new = _new_activation(act, keep, spec["op"] == "swish_ff")
        new_out = nn.Linear(keep, out.out_features, bias=out.bias is not None) if keep != inner else out
        if carry:
            _carry_ff(act, out, new, new_out, inner, keep)
        ff.net[0], ff.net[2] = new.to(out.weight.device), new_out.to(out.weight.device)


@torch.no_grad()
def _carry_ff(act, out, new, new_out, inner: int, keep: int) -> None:
    """Copy the ``keep`` inner units with the largest |w_in| x |w_out| (gated: value and gate rows together)."""
    w_in, b_in = act.proj.weight, act.proj.bias  # gated: (2 inner, dim), value rows then gate rows
    gated = w_in.shape[0] == 2 * inner
    w_score = w_in[:inner].norm(dim=1) * (w_in[inner:].norm(dim=1) if gated else 1.0)
    score = w_score * out.weight.norm(dim=0)  # (inner,)
    idx = torch.sort(torch.topk(score, keep).indices).values if keep != inner else torch.arange(inner)
    rows = torch.cat([idx, idx + inner]) if gated else idx
    new.proj.weight.copy_(w_in[rows])
    if b_in is not None:
        new.proj.bias.copy_(b_in[rows])
    if new_out is not out:
        new_out.weight.copy_(out.weight[:, idx])
        if out.bias is not None:
            new_out.bias.copy_(out.bias)


def _cross_only(unet, spec, carry: bool) -> None:
    for _, block in _selected(unet, spec.get("blocks"), "BasicTransformerBlock"):
        if getattr(block, "attn2", None) is None and not block.only_cross_attention:
            raise ValueError("cross_only needs transformer blocks with a cross-attention")
        block.attn1 = NoAttention()


_APPLY = {"separable": _separable, "shared_kv": _attention_op, "relu_attention": _attention_op,
          "swish_ff": _feed_forward, "trim_ff": _feed_forward, "cross_only": _cross_only}


def check_spec(spec: dict) -> dict:
    if spec.get("op") not in OPS:
        raise ValueError(f"unknown block operation {spec.get('op')!r}; choose from {', '.join(OPS)}")
    if spec["op"] == "trim_ff" and not 0 < float(spec.get("ratio", 0.5)) <= 1:
        raise ValueError(f"trim_ff ratio must be in (0, 1], got {spec.get('ratio')}")
    return spec


def apply_ops(unet: nn.Module, specs: Iterable[dict], carry: bool = True, record: bool = True) -> nn.Module:
    """Apply operations (dicts ``{"op": name, "blocks": [prefixes] | "all", ...}``) in order, in place; ``carry``
    initialises new parameters from the old ones (the loader passes False: the file has them); ``record`` appends
    them to the UNet's config."""
    specs = [check_spec(dict(s)) for s in specs]
    for spec in specs:
        _APPLY[spec["op"]](unet, spec, carry)
    if record:
        unet.register_to_config(**{OPS_KEY: list(getattr(unet.config, OPS_KEY, None) or []) + specs})
    return unet


def saved_config(config: dict) -> dict:
    """The config.json a UNet with operations is saved with: block types prefixed so stock diffusers refuses it."""
    if not config.get(OPS_KEY):
        return config
    out = dict(config)
    for key in ("down_block_types", "up_block_types"):
        out[key] = [t if t.startswith(TYPE_PREFIX) else TYPE_PREFIX + t for t in config[key]]
    if out.get("mid_block_type"):
        out["mid_block_type"] = out["mid_block_type"] if out["mid_block_type"].startswith(TYPE_PREFIX) else \
            TYPE_PREFIX + out["mid_block_type"]
    return out


def buildable_config(config: dict) -> dict:
    """A saved config with pocketdiff's keys and type prefixes taken off: what diffusers builds the UNet from."""
    out = {k: v for k, v in config.items() if k not in (OPS_KEY, "pocketdiff_removed_blocks")}
    for key in ("down_block_types", "up_block_types"):
        if key in out:
            out[key] = [t.removeprefix(TYPE_PREFIX) for t in out[key]]
    if isinstance(out.get("mid_block_type"), str):
        out["mid_block_type"] = out["mid_block_type"].removeprefix(TYPE_PREFIX)
    return out
