"""The three exported graphs, their fixed signatures, sample inputs and the parity metric.

Every exporter turns the same three tensor-in/tensor-out modules into artefacts:

========================  ==========================================================================
``text_encoder``          ``input_ids`` int64 (batch, L)  ->  ``last_hidden_state`` f32 (batch, L, D)
``unet``                  ``sample`` f32 (batch, C, h, w), ``timestep`` f32 (batch,),
                          ``encoder_hidden_states`` f32 (batch, L, D)
                          [, ``timestep_cond`` f32 (batch, E) when the UNet has a guidance embedding]
                          ->  ``out`` f32 (batch, C, h, w) (the model's prediction type)
``vae_decoder``           ``latent`` f32 (batch, C, h, w), *unscaled* (divided by scaling_factor)
                          ->  ``image`` f32 (batch, 3, H, W) in [-1, 1]
========================  ==========================================================================

In ONNX ``batch`` is dynamic (CFG runs the UNet at twice the prompt batch). ExecuTorch and Core ML
artefacts have static shapes, as mobile runtimes prefer: one prompt, so the UNet's batch is 2 (the
CFG pair) or 1 (a UNet with a guidance embedding, LCM-style). L, h, w and H, W are fixed at the
model's default size and the tokenizer's length; the manifest records every shape.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import PocketdiffError


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


class DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder

    def forward(self, latent):
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)


@dataclass
class GraphSpec:
    """One exported graph: the module, named sample inputs and the manifest's signature."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    config: dict = field(default_factory=dict)

    def reference(self) -> torch.Tensor:
        """torch's output on the sample inputs (computed once)."""
        if not hasattr(self, "_reference"):
            with torch.no_grad():
                self._reference = self.module(*self.inputs.values())
        return self._reference

    def signature(self, dynamic_batch: bool = True) -> dict:
        """Inputs and outputs as {name, dtype, shape}; the batch axis is "batch" when it is dynamic."""
        def io(name, t):
            return {"name": name, "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": ["batch" if dynamic_batch else t.shape[0]] + list(t.shape[1:])}

        return {"inputs": [io(n, t) for n, t in self.inputs.items()], "outputs": [io(self.outputs[0], self.reference())]}


def graph_specs(parts: dict, batch: int | None = 2, seed: int = 0) -> list[GraphSpec]:
    """The three graphs of a loaded model (``folder.load_components``) with seeded sample inputs.

    ``batch=None`` gives the fixed batches of a static-shape export: one prompt, so the UNet runs at
    batch 2 (the CFG pair) unless it has a guidance embedding (batch 1), and the decoder at batch 1.
    """
    unet, vae, text, tok = parts["unet"].eval(), parts["vae"].eval(), parts["text_encoder"].eval(), parts["tokenizer"]
    g = torch.Generator().manual_seed(seed)
    w_dim = getattr(unet.config, "time_cond_proj_dim", None)
    text_b, unet_b, dec_b = (1, 1 if w_dim else 2, 1) if batch is None else (batch, batch, batch)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    side = int(unet.config.sample_size)
    L, vocab = tok.model_max_length, text.config.vocab_size
    hidden = text.config.hidden_size
    ids = torch.randint(0, vocab, (text_b, L), generator=g)
    unet_in = {"sample": torch.randn(unet_b, unet.config.in_channels, side, side, generator=g),
               "timestep": torch.tensor([999.0, 1.0] * (unet_b // 2) + [500.0] * (unet_b % 2)),
               "encoder_hidden_states": torch.randn(unet_b, L, hidden, generator=g)}
    if w_dim:
        unet_in["timestep_cond"] = torch.randn(unet_b, w_dim, generator=g)
    latent = torch.randn(dec_b, vae.config.latent_channels, side, side, generator=g)
    return [
        GraphSpec("text_encoder", TextEncoderGraph(text).eval(), {"input_ids": ids}, ["last_hidden_state"],
                  {"max_length": L, "hidden_size": hidden}),
        GraphSpec("unet", UNetGraph(unet).eval(), unet_in, ["out"],
                  {"sample_size": side, "in_channels": unet.config.in_channels, "time_cond_proj_dim": w_dim}),
        GraphSpec("vae_decoder", DecoderGraph(vae).eval(), {"latent": latent}, ["image"],
                  {"scaling_factor": vae.config.scaling_factor,
                   "shift_factor": getattr(vae.config, "shift_factor", None),
                   "block_out_channels": list(vae.config.block_out_channels), "latent_channels":
                   vae.config.latent_channels, "image_size": side * f}),
    ]


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


@contextmanager
def guarded(fmt: str, graph: str):
    """Exporter and runtime chatter silenced, and any failure turned into one line naming the graph."""
    level = logging.root.manager.disable
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        except PocketdiffError:
            raise
        except Exception as e:  # converters raise anything; the user needs the graph and the first line
            raise PocketdiffError(f"{fmt} export of {graph} failed: {first_line(e)}") from None
        finally:
            logging.disable(level)


@dataclass
class Parity:
    """Exported vs torch on the same inputs. PSNR is relative to the reference's peak-to-peak range."""

    max_abs: float
    psnr: float

    @classmethod
    def of(cls, got: torch.Tensor, ref: torch.Tensor) -> "Parity":
        if tuple(got.shape) != tuple(ref.shape):
            return cls(math.inf, -math.inf)  # a wrong shape never passes (no broadcasting)
        got, ref = got.double(), ref.double()
        mse = float((got - ref).pow(2).mean())
        span = float(ref.max() - ref.min()) or 1.0
        psnr = math.inf if mse == 0 else 10 * math.log10(span**2 / mse)
        return cls(float((got - ref).abs().max()), psnr)

    def check(self, name: str, fmt: str, max_abs: float, min_psnr: float) -> None:
        if not (self.max_abs <= max_abs and self.psnr >= min_psnr):  # NaN fails too
            raise PocketdiffError(f"{fmt} export of {name} does not match torch: max abs error {self.max_abs:.3g} "
                                  f"(limit {max_abs:g}), PSNR {self.psnr:.1f} dB (limit {min_psnr:g}); nothing written")

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "psnr_db": None if math.isinf(self.psnr) else round(self.psnr, 2)}


def with_progress(specs, fmt: str):
    """``specs`` with a progress bar on stderr naming the graph being exported and checked (an export is
    minutes of silence otherwise)."""
    import sys

    from tqdm import tqdm

    specs = list(specs)
    bar = tqdm(specs, desc=f"{fmt} export", unit="graph", file=sys.stderr, dynamic_ncols=True)
    for spec in bar:
        bar.set_description(f"{fmt} export: {spec.name} (trace, save, parity check)")
        yield spec
