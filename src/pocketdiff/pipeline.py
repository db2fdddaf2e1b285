"""Text -> image: encode the prompt, sample latents, decode, with per-stage timings.

``load_pipeline(path)`` reads a local diffusers-format folder; ``pipe(prompts, ...)`` returns a
:class:`GenerationResult` with PIL images, the final (diffusers-scale) latents, the seed of every
image and the time spent in each stage.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import folder as folder_io
from .denoiser import Conditioning, Denoiser, UNetRunner, guidance_scale_embedding
from .errors import PocketdiffError, PromptTruncatedWarning
from .sampling import SAMPLERS
from .models.registry import SamplingSettings, sampling_settings
from .schedule import NoiseSchedule, default_spacing, lcm_boundary, timestep_grid


@dataclass
class Timings:
    """Seconds spent per stage of one generation call."""

    text_encoder: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    decoder: float = 0.0
    total: float = 0.0

    @property
    def unet_per_step(self) -> float:
        return statistics.median(self.unet_steps) if self.unet_steps else 0.0

    @property
    def slowest_step(self) -> float:
        return max(self.unet_steps) if self.unet_steps else 0.0

    def line(self) -> str:
        return (f"text encoder {self.text_encoder:.3f} s | UNet {self.unet_per_step:.3f} s/step (slowest "
                f"{self.slowest_step:.3f}) x {len(self.unet_steps)} | decoder {self.decoder:.3f} s | "
                f"total {self.total:.3f} s")


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: torch.Tensor  # (B, C, h, w), the scale diffusers' pipelines return with output_type="latent"
    prompts: list[str]
    seeds: list[int | None]
    timings: Timings
    settings: SamplingSettings | None = None  # the steps, sampler and guidance used, and where each came from


def _check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PocketdiffError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class Pipeline:
    """A Stable-Diffusion-class text-to-image model: UNet, VAE, CLIP text encoder, tokenizer, schedule."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, *, runner: str = "auto",
                 name: str | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        try:
            self.schedule = NoiseSchedule.from_config(scheduler_config)
        except (ValueError, TypeError) as e:
            raise PocketdiffError(f"scheduler_config.json: {e}") from None
        self.runner = UNetRunner(unet, mode=runner)
        self.denoiser = Denoiser(self.runner, self.schedule)
        self.name = name or "pipeline"
        self.source: Path | None = None  # the folder it was loaded from, if any
        self.defaults: dict = {}  # the model card's sampling defaults (steps, sampler, guidance), if any
        self.vae_tile: int | None = None  # latent pixels per VAE decoding tile (None: untiled)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path, *, trust_pickle: bool = False, runner: str = "auto",
                    vae: str | Path | None = None) -> "Pipeline":
        """Load a model folder; ``vae``: a VAE folder, or a shipped VAE component by name (e.g.
        ``shapes-vae-pruned``), used instead of the folder's own."""
        from .models.components import shipped_components
        from .models.registry import model_card

        parts = folder_io.load_components(path, trust_pickle=trust_pickle)
        if vae is not None:
            vae = shipped_components().get(str(vae), vae) if not Path(vae).exists() else vae
            parts["vae"] = folder_io.load_vae(vae, trust_pickle=trust_pickle)
            channels, expected = parts["vae"].config.latent_channels, parts["unet"].config.in_channels
            if channels != expected:
                raise PocketdiffError(f"{vae}: has {channels} latent channels but the UNet of {path} takes {expected}; "
                                      "pass a VAE made for this model's latents")
        pipe = cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler_config"],
                   runner=runner, name=Path(path).name)
        pipe.source = Path(path)
        pipe.defaults = model_card(Path(path)).get("defaults", {})
        return pipe

    def settings(self, steps: int | None = None, sampler: str | None = None,
                 guidance: float | None = None) -> SamplingSettings:
        """What a call samples with: each value given, else the model card's default, else the fallback."""
        return sampling_settings(self.defaults, steps, sampler, guidance)

    def enable_tiling(self, *, attention_chunk: int | None = None, vae_tile: int | None = None,
                      stream_unet: bool = False, unet_weights: str | Path | None = None) -> "Pipeline":
        """Model-level tiling (see :mod:`pocketdiff.tiling`): attention over query chunks in the UNet and VAE,
        VAE decoding in overlapping tiles, UNet blocks streamed from their weights file."""
        from . import tiling

        if attention_chunk is not None:
            tiling.enable_attention_chunking(self.unet, attention_chunk)
            tiling.enable_attention_chunking(self.vae, attention_chunk)
            self.runner.reset()  # a trace made before would keep the old attention
        if vae_tile is not None:
            f = self.vae_scale_factor
            if vae_tile <= 0 or vae_tile % (4 * f):
                raise PocketdiffError(f"VAE tile must be a positive multiple of {4 * f} pixels, got {vae_tile}")
            self.vae_tile = vae_tile // f
        if stream_unet:
            weights = Path(unet_weights) if unet_weights else None
            if weights is None and self.source is not None:
                weights = self.source / "unet" / "diffusion_pytorch_model.safetensors"
            if self.source is not None and (self.source / "unet" / "quantization.json").is_file():
                raise PocketdiffError("a quantized UNet cannot be streamed (its file holds int8 weights); stream the "
                                      "float model folder instead")
            if weights is None or not weights.is_file():
                raise PocketdiffError("streaming the UNet needs its safetensors weights file; load the model from a "
                                      "folder saved with safetensors (quantized UNets cannot be streamed)")
            if not isinstance(self.unet, tiling.StreamedUNet):
                self.unet = tiling.StreamedUNet(self.unet, weights)
            self.runner = UNetRunner(self.unet, mode="eager")  # a trace would freeze the released weights
            self.denoiser = Denoiser(self.runner, self.schedule)
        return self

    def to(self, device: str | torch.device) -> "Pipeline":
        """Move the UNet, VAE and text encoder to ``device`` (as diffusers' ``pipe.to("cuda")``). Each stage
        runs where its module is, so the components may also be placed one by one."""
        for module in (self.unet, self.vae, self.text_encoder):
            if not isinstance(module, torch.nn.Module):
                raise PocketdiffError(f"{type(module).__name__} runs outside torch and cannot be moved; load the "
                                      "model with the torch backend to use another device")
            module.to(device)
        self.runner.reset()  # a trace holds the device it was made on
        return self

    @property
    def device(self) -> torch.device:
        """Where the UNet is, and so where sampling runs."""
        return _module_device(self.unet)

    def save(self, path: str | Path, overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
        return folder_io.save_components(path, self.unet, self.vae, self.text_encoder, self.tokenizer,
                                         self.scheduler_config, overwrite=overwrite, extra_files=extra_files)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width), defaulting to the model's size; both must be positive multiples of the VAE factor."""
        height = self.default_size if height is None else height  # an explicit 0 is an error, not the default
        width = self.default_size if width is None else width
        f = self.vae_scale_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise PocketdiffError(f"height and width must be positive multiples of {f} (the VAE factor), got {height}x{width}")
        return height, width

    # ---- stages -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) last hidden states of the text encoder, prompts padded/truncated to its limit."""
        limit = self.tokenizer.model_max_length
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        full = self.tokenizer(list(prompts), padding="longest", return_tensors="pt")
        if full.input_ids.shape[-1] > limit:
            # token counts from the attention mask: CLIP tokenizers often pad with their EOS token
            for p, ids, n in zip(prompts, full.input_ids, full.attention_mask.sum(-1).tolist()):
                if n > limit:
                    dropped = self.tokenizer.decode(ids[limit - 1:n - 1])
                    words = dropped.split()
                    shown = " ".join(words[:6]) + (f" ... ({len(words)} words)" if len(words) > 6 else "")
                    warnings.warn(f"prompt longer than {limit} tokens was truncated; dropped: {shown!r}",
                                  PromptTruncatedWarning, stacklevel=3)
        return self.text_encoder(tok.input_ids.to(_module_device(self.text_encoder)))[0].to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] from diffusers-scale latents."""
        z = decoder_input(latents.to(_module_device(self.vae)), self.vae.config)
        if self.vae_tile:
            from .tiling import tiled_decode

            return tiled_decode(self.vae, z, tile=self.vae_tile, overlap=self.vae_tile // 4)
        return self.vae.decode(z, return_dict=False)[0]

    def sigmas(self, steps: int, sampler: str, spacing: str | None = None) -> tuple[np.ndarray, float]:
        """(steps+1,) noise levels of a sampler's grid, and the scale of its initial noise."""
        spec = SAMPLERS[sampler]
        grid = timestep_grid(self.schedule, steps, spec.grid, spacing)  # type: ignore[arg-type]
        final = self.schedule.final_sigma_ddim() if spec.final == "ddim" else 0.0
        sigmas = np.append(self.schedule.t_to_sigma(grid), final)
        spacing = spacing or self.schedule.timestep_spacing or default_spacing(spec.grid)
        ve_start = spec.init == "ve" and spacing in ("linspace", "trailing")  # diffusers' Euler init_noise_sigma
        init = float(np.float32(sigmas[0])) if ve_start else math.sqrt(float(sigmas[0]) ** 2 + 1.0)
        return sigmas, init

    # ---- generation --------------------------------------------------------------------------
    def _check_call(self, prompts, steps, sampler, guidance, height, width, timestep_spacing,
                    num_images_per_prompt) -> tuple[float, int, int, np.ndarray, float]:
        """Validated (guidance, height, width) and the sampler's noise levels and initial noise scale."""
        if not prompts:
            raise PocketdiffError("no prompts given; pass at least one prompt (an empty string is unconditional)")
        if sampler not in SAMPLERS:
            raise PocketdiffError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(steps, int) or steps < 1:
            raise PocketdiffError(f"steps must be an integer >= 1, got {steps!r}")
        guidance = _check_finite("guidance", guidance)
        height, width = self.check_size(height, width)
        if timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise PocketdiffError(f"unknown timestep spacing {timestep_spacing!r}; choose leading, trailing or linspace")
        try:
            sigmas, init_sigma = self.sigmas(steps, sampler, timestep_spacing)
        except ValueError as e:
            raise PocketdiffError(str(e)) from None
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise PocketdiffError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        self.check_memory(height, width, len(prompts) * num_images_per_prompt)
        return guidance, height, width, sigmas, init_sigma

    def check_memory(self, height: int, width: int, batch: int) -> None:
        """Refuse, in one line, a size whose decoding alone needs more memory than the machine has."""
        from .memory import check_fits, decode_bytes

        channels = int(self.vae.config.block_out_channels[0])
        needed = decode_bytes(channels, height, width, batch, self.vae_tile, self.vae_scale_factor)
        check_fits(needed, f"decoding {batch} {height}x{width} image(s)",
                   "lower --height/--width or --batch-size, or decode in tiles (--vae-tile)")

    def conditioning(self, prompts: list[str], negative_prompt, guidance: float, n_prompts: int,
                     per_prompt: int) -> Conditioning:
        """Text states of the (repeated) prompts, and CFG's negative-prompt states or the guidance embedding."""
        b = len(prompts)
        cond_states = self.encode_prompt(prompts)  # (B, L, D)
        w_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        uncond_states, w_emb = None, None
        if w_dim:
            w_emb = guidance_scale_embedding(torch.full((b,), guidance - 1.0), w_dim).to(self.device)  # (B, E)
        elif guidance != 1.0:
            neg = [negative_prompt or ""] * n_prompts if isinstance(negative_prompt, (str, type(None))) else list(negative_prompt)
            if len(neg) != n_prompts:
                raise PocketdiffError(f"got {len(neg)} negative prompts for {n_prompts} prompts; pass one, or one per prompt")
            uncond_states = self.encode_prompt([n for n in neg for _ in range(per_prompt)])
        return Conditioning(cond_states, uncond_states, guidance, w_emb)

    @staticmethod
    def generators(b: int, seed: int | None, generator) -> tuple[list[torch.Generator] | torch.Generator, list]:
        """One generator per image (image i of seed s is reproducible alone with seed s+i), or the caller's."""
        if generator is None:
            seed = 0 if seed is None else int(seed)
            return [torch.Generator().manual_seed(seed + i) for i in range(b)], [seed + i for i in range(b)]
        if isinstance(generator, list) and len(generator) != b:
            raise PocketdiffError(f"got {len(generator)} generators for {b} images; pass one per image "
                                  "(prompts x num_images_per_prompt) or a single generator")
        return generator, [None] * b

    def sample(self, x: torch.Tensor, sigmas: np.ndarray, sampler: str, cond: Conditioning, generator,
               steps: int, step_times: list[float], callback=None) -> torch.Tensor:
        """Run ``sampler`` from the VE latent ``x`` at ``sigmas[0]``; each step's time goes to ``step_times``."""
        spec = SAMPLERS[sampler]
        last = [time.perf_counter()]

        def on_step(info: dict) -> None:
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            if callback is not None:
                callback(info)

        kwargs = {}
        if spec.stochastic:
            kwargs["noise_sampler"] = lambda s, s_next: _randn(tuple(x.shape), generator).to(x.device)
        if spec.boundary:
            kwargs["boundary"] = lambda s: lcm_boundary(self.schedule, self.denoiser.sigma_to_t(s))
        self.runner.plan_calls(max(self.runner.planned_calls, steps))  # a caller may have planned more
        last[0] = time.perf_counter()
        return spec.fn(self.denoiser, x, sigmas, extra_args={"cond": cond}, callback=on_step, **kwargs)

    def __call__(self, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                 seed: int | None = 0,
                 generator: torch.Generator | list[torch.Generator] | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, timestep_spacing: str | None = None,
                 output_type: str = "pil", callback=None) -> GenerationResult:
        """Generate one image per prompt (times ``num_images_per_prompt``). ``steps``, ``sampler`` and ``guidance``
        default to the model card's (:meth:`settings`)."""
        t_start = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        chosen = self.settings(steps, sampler, guidance)
        steps, sampler, guidance = chosen.steps, chosen.sampler, chosen.guidance
        guidance, height, width, sigmas, init_sigma = self._check_call(
            prompts, steps, sampler, guidance, height, width, timestep_spacing, num_images_per_prompt)
        timings = Timings()
        n_prompts = len(prompts)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        # 1. text conditioning
        t0 = time.perf_counter()
        cond = self.conditioning(prompts, negative_prompt, guidance, n_prompts, num_images_per_prompt)
        timings.text_encoder = time.perf_counter() - t0
        # 2. noise, drawn on the CPU: the same images on every device
        generator, seeds = self.generators(len(prompts), seed, generator)
        f = self.vae_scale_factor
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        x = _randn(shape, generator).to(self.device) * init_sigma  # (B, C, h, w) VE latent at sigmas[0]
        # 3. sampling
        x = self.sample(x, sigmas, sampler, cond, generator, steps, timings.unet_steps, callback)
        latents = x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)  # VE -> VP (diffusers) scale
        # 4. decoding
        images: list[Image.Image] = []
        if output_type != "latent":
            t0 = time.perf_counter()
            pixels = self.decode(latents)
            timings.decoder = time.perf_counter() - t0
            images = to_pil(pixels)
        timings.total = time.perf_counter() - t_start
        return GenerationResult(images, latents, prompts, seeds, timings, chosen)


def decoder_input(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Diffusers-scale latents (what the UNet sees) as the VAE decoder's input: unscaled, unshifted."""
    z = latents / vae_config.scaling_factor
    shift = getattr(vae_config, "shift_factor", None)
    return z + shift if shift else z


def _module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for one without any, or for a non-torch runtime's
    stand-in such as an ONNX Runtime session)."""
    params = module.parameters() if isinstance(module, torch.nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


def _randn(shape: tuple, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal draws, per-sample when given a list of generators (as diffusers' randn_tensor)."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as diffusers' image processor does."""
    arr = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (arr * 255).round().astype(np.uint8)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(pixels)]


def load_pipeline(path: str | Path = "default", *, trust_pickle: bool = False, runner: str = "auto",
                  vae: str | Path | None = None) -> Pipeline:
    """Load a local diffusers-format folder, or a shipped model by name (see ``pocketdiff models``);
    ``vae``: a VAE folder, or a shipped VAE component by name (e.g. ``shapes-vae-pruned``), to decode with
    instead of the model's own."""
    from .models.registry import resolve_model

    return Pipeline.from_folder(resolve_model(path), trust_pickle=trust_pickle, runner=runner, vae=vae)
