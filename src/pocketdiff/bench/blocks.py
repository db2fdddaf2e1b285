"""Per-block latency of a UNet: the latency lookup table that SnapFusion's architecture evolution uses.

One forward pass records the real inputs of every block (ResNet, cross-attention transformer, down/up
sampler, and the stem/head layers) with forward hooks; each block is then timed alone on those inputs.
Rows carry stage, resolution, channels, params and MACs, so latency can be compared with compute.
"""

from __future__ import annotations

import statistics
import time

import torch

from .measure import component_call, count_macs, count_params

BLOCK_TYPES = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")
STEM = ("conv_in", "time_embedding", "conv_norm_out", "conv_out")


def unet_blocks(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every timed block: the UNet's blocks in definition order, then its stem and head."""
    named = [(n, m) for n, m in unet.named_modules() if type(m).__name__ in BLOCK_TYPES]
    named += [(n, getattr(unet, n)) for n in STEM if getattr(unet, n, None) is not None]
    return named


def _stage(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


@torch.no_grad()
def captured_inputs(unet: torch.nn.Module, *, resolution: int, batch: int = 1, cfg: bool = True,
                    latent_factor: int = 8, seq_len: int | None = None) -> dict[str, tuple]:
    """Block name -> (module, args, kwargs, output) of its first call in one UNet step (forward hooks)."""
    fn, inputs = component_call("unet", unet, resolution=resolution, batch=batch, cfg=cfg, latent_factor=latent_factor,
                                seq_len=seq_len)
    captured: dict[str, tuple] = {}

    def hook(name):
        def f(module, args, kwargs, output):
            if name not in captured:  # first call only (blocks run once per step)
                out = output[0] if isinstance(output, tuple) else output
                captured[name] = (module, args, kwargs, out)

        return f

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in unet_blocks(unet)]
    try:
        fn(*inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def median_ms(call, runs: int, warmup: int) -> tuple[float, float]:
    """(median, min) wall time of ``call()`` in ms."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


@torch.no_grad()
def per_block_latency(unet: torch.nn.Module, *, resolution: int, batch: int = 1, cfg: bool = True, runs: int = 5,
                      warmup: int = 1, latent_factor: int = 8, seq_len: int | None = None) -> list[dict]:
    """Rows {block, type, stage, resolution, channels, params, macs, median_ms, min_ms} for one UNet step."""
    captured = captured_inputs(unet, resolution=resolution, batch=batch, cfg=cfg, latent_factor=latent_factor,
                               seq_len=seq_len)
    rows = []
    for name, _ in unet_blocks(unet):
        if name not in captured:
            continue
        module, args, kwargs, out = captured[name]
        call = lambda m=module, a=args, k=kwargs: m(*a, **k)  # noqa: E731
        med, low = median_ms(call, runs, warmup)
        shape = tuple(out.shape)
        rows.append({"block": name, "type": type(module).__name__, "stage": _stage(name),
                     "resolution": shape[-1] if len(shape) == 4 else None,
                     "channels": shape[1] if len(shape) == 4 else shape[-1], "params": count_params(module),
                     "macs": count_macs(call), "median_ms": med, "min_ms": low})
    return rows


def blocks_markdown(rows: list[dict]) -> str:
    total = sum(r["median_ms"] for r in rows) or 1.0
    lines = ["| block | type | res | ch | params M | GMACs | median ms | % of step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['type']} | {r['resolution'] or ''} | {r['channels']} | "
                     f"{r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | {r['median_ms']:.2f} | "
                     f"{100 * r['median_ms'] / total:.1f} |")
    return "\n".join(lines)


def by_type_and_resolution(rows: list[dict]) -> list[dict]:
    """Totals per (type, resolution): where the time goes, and whether it follows the MACs."""
    acc: dict[tuple, dict] = {}
    for r in rows:
        key = (r["type"], r["resolution"])
        a = acc.setdefault(key, {"type": r["type"], "resolution": r["resolution"], "blocks": 0, "macs": 0,
                                 "median_ms": 0.0})
        a["blocks"] += 1
        a["macs"] += r["macs"]
        a["median_ms"] += r["median_ms"]
    for a in acc.values():
        a["gmacs_per_s"] = a["macs"] / 1e9 / max(a["median_ms"] / 1e3, 1e-9)
    return sorted(acc.values(), key=lambda a: -a["median_ms"])
