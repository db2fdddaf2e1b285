"""A channel-pruned VAE trained by data distillation (SnapFusion, section 4).

At the Shapes model's 64 px the VAE decoder costs more than a 2-step compact UNet (measured: 61% of a
2-step generation). SnapFusion's answer: prune the decoder's channels uniformly (50%) and train it to
reproduce the original decoder, on latents that the diffusion model itself generates from text prompts
("data distillation": no real images needed, and the decoder is tuned to the latents it will decode).

Here:

- :func:`pruned_config`: the teacher AutoencoderKL's config at ``width`` x every block's channels (and
  as many channels per GroupNorm group), so the result is a plain ``AutoencoderKL`` that diffusers and
  every pocketdiff loader take as it is. The encoder is pruned too (AutoencoderKL has one channel list)
  and distilled to the teacher's posterior, so the latents, their scaling factor and img2img still match.
- :func:`inherit_sliced`: the student starts from the teacher's first channels of every tensor. Keeping
  the same leading channels everywhere keeps residual streams consistent, and with groups scaled by
  ``width`` every kept GroupNorm group is one of the teacher's groups, whole.
- ``--arch tiny`` (:func:`tiny_vae`): in place of the pruned AutoencoderKL, a TAESD-style diffusers
  ``AutoencoderTiny`` (plain ReLU conv blocks, no attention or GroupNorm), trained from scratch with the same
  loss; its encoder is matched to the teacher's posterior mean.
- ``--init-from`` (:func:`init_weights`): start from a decoder this recipe trained before (same architecture),
  e.g. to tune a shipped pruned VAE to another model's latents.
- the loss: decoder outputs matched to the teacher decoder's (object-weighted L1 + L2) on a mix of
  generated latents (:func:`cached_generated`, made once by a model folder's own sampler) and posterior
  samples of fresh renders; encoder posterior mean (and, lightly, log-variance) matched by MSE.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..latents import to_pixels
from .autoencoder import foreground_weights, psnr, reconstruct, reconstruction_quality, weighted_mean

DEFAULT_TRAIN = dict(out_dir="runs/shapes-decoder", steps=2000, batch_size=16, lr=5e-4, warmup_steps=50,
                     log_every=50, checkpoint_every=200, monitor_every_s=180, ema_decay=0.999)


@dataclass
class DecoderRecipe:
    # "pruned": the teacher's AutoencoderKL with its channels cut (SnapFusion), started from the teacher's slices;
    # "tiny": a TAESD-style diffusers AutoencoderTiny (tiny_channels per block, ReLU conv blocks, no attention,
    # no GroupNorm) trained from scratch by the same data distillation
    arch: str = "pruned"
    tiny_channels: int = 64  # arch tiny: channels of every encoder and decoder block (TAESD: 64)
    width: float = 0.5  # fraction of every block's channels kept (SnapFusion: 0.5)
    channels: str = ""  # or explicit channels per block, e.g. "32,32,64" (each at most the teacher's; overrides width)
    # a VAE folder or shipped component (e.g. shapes-vae-pruned) of the same architecture whose weights start the
    # student instead of the teacher's slices (arch tiny: instead of the random start), e.g. to train it on
    # another generator's latents
    init_from: str = ""
    generator: str = ""  # model folder whose generations are the distillation latents ("" = the teacher folder)
    n_generated: int = 2000  # generated latents, made once and cached in OUT
    generator_steps: int = 0  # 0: the generator's own default steps / sampler / guidance (its model card)
    generator_sampler: str = ""  # "": the generator card's sampler
    generator_guidance: float = 0.0  # 0: the generator card's guidance
    generated_fraction: float = 0.5  # share of each batch from generated latents (the rest: encoded renders)
    foreground_weight: float = 4.0  # extra decoder-loss weight on object pixels
    l2_weight: float = 1.0  # weight of the decoder's pixel MSE beside its L1 term
    encoder_weight: float = 1.0  # MSE to the teacher's posterior mean (0: leave the pruned encoder as inherited)
    logvar_weight: float = 0.01  # weight of the MSE to the teacher's posterior log-variance
    monitor_n: int = 256  # fresh renders reconstructed and checked per monitor call
    final_check_n: int = 1000  # fresh renders checked at the end (OUT/vae/quality.json)
    # the real images (and the generations' prompts): "shapes" (fresh renders every step), or an image folder or
    # webdataset shards (see pocketdiff.data.datasets), of which pool_size images are fitted once and kept in memory
    data: str = "shapes"
    resolution: int = 64  # pixels of the real images and of the generations
    pool_size: int = 2000  # real images kept from a folder or shards (the last monitor_n of them: the check's)

    def __post_init__(self):
        if self.arch not in ("pruned", "tiny") or self.tiny_channels < 1:
            raise ValueError(f"arch must be pruned or tiny and tiny_channels >= 1, got {self.arch!r}, "
                             f"{self.tiny_channels}")
        if not 0 < self.width <= 1:
            raise ValueError(f"width must be in (0, 1], got {self.width}")
        if self.channels and not all(c.strip().isdigit() and int(c) > 0 for c in self.channels.split(",")):
            raise ValueError(f"channels must be comma-separated positive integers such as 32,32,64, got "
                             f"{self.channels!r}")
        if not 0 <= self.generated_fraction <= 1:
            raise ValueError(f"generated_fraction must be in [0, 1], got {self.generated_fraction}")
        if self.n_generated < 1 and self.generated_fraction > 0:
            raise ValueError("n_generated must be >= 1 when generated_fraction > 0")
        if self.pool_size < 2 or self.monitor_n < 1:
            raise ValueError(f"pool_size must be >= 2 and monitor_n >= 1, got {self.pool_size}, {self.monitor_n}")


def pruned_config(config: dict, width: float, channels: list[int] | None = None) -> dict:
    """An AutoencoderKL config with ``width`` x the channels of every block (same groups' size), or with
    explicit per-block ``channels`` (each at most the teacher's; GroupNorm groups kept where they divide)."""
    groups = config.get("norm_num_groups", 32)
    teacher = list(config["block_out_channels"])
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    if channels:
        if len(channels) != len(teacher) or any(c > t for c, t in zip(channels, teacher)):
            raise ValueError(f"channels {channels} must give one count per block, each at most the teacher's {teacher}")
        if any(c % groups for c in channels):
            raise ValueError(f"channels {channels} must be multiples of norm_num_groups {groups}")
        return {**clean, "block_out_channels": list(channels)}
    scaled = [c * width for c in teacher] + [groups * width]
    if any(c != int(c) for c in scaled):
        raise ValueError(f"width {width} does not divide channels {teacher} and norm_num_groups {groups} into "
                         "whole numbers; choose e.g. 0.5 or 0.25")
    return {**clean, "block_out_channels": [int(c * width) for c in teacher], "norm_num_groups": int(groups * width)}


@torch.no_grad()
def inherit_sliced(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Copy every teacher tensor's leading slice into the same-named student tensor; returns how many.

    Attention layers whose head width shrank get their query scaled by the ratio of the softmax scales
    (1/sqrt(head dim)), so the kept channels' attention logits are the teacher's.
    """
    from diffusers.models.attention_processor import Attention

    t_sd = teacher.state_dict()
    n = 0
    for name, s in student.state_dict().items():
        t = t_sd.get(name)
        if t is None or t.dim() != s.dim() or any(a > b for a, b in zip(s.shape, t.shape)):
            raise ValueError(f"{name}: the pruned model's tensor {tuple(s.shape)} is not a slice of the teacher's "
                             f"{None if t is None else tuple(t.shape)}")
        s.copy_(t[tuple(slice(0, k) for k in s.shape)])
        n += 1
    t_modules = dict(teacher.named_modules())
    for name, m in student.named_modules():
        if isinstance(m, Attention) and isinstance(t_modules.get(name), Attention) and m.scale != t_modules[name].scale:
            for p in m.to_q.parameters():
                p.mul_(t_modules[name].scale / m.scale)
    return n


def prune_vae(teacher, width: float, channels: list[int] | None = None):
    """A pruned copy of ``teacher`` (an AutoencoderKL) initialised from its leading channels."""
    from diffusers import AutoencoderKL

    student = AutoencoderKL(**pruned_config(dict(teacher.config), width, channels))
    inherit_sliced(student, teacher)
    return student


def tiny_vae(teacher, channels: int = 64):
    """A TAESD-style ``AutoencoderTiny`` for the teacher's latents: as many blocks as the teacher has (so the same
    down/upsampling factor), ``channels`` each, TAESD's block counts (encoder 1, 3, 3, ...; decoder ..., 3, 3, 1),
    the teacher's scaling and shift factors (it takes and gives the teacher's unscaled latents, so pipelines divide
    by the scaling factor as for the teacher)."""
    from diffusers import AutoencoderTiny

    n = len(teacher.config.block_out_channels)
    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(channels,) * n, decoder_block_out_channels=(channels,) * n,
                           num_encoder_blocks=(1,) + (3,) * (n - 1), num_decoder_blocks=(3,) * (n - 1) + (1,),
                           latent_channels=teacher.config.latent_channels,
                           scaling_factor=teacher.config.scaling_factor,
                           shift_factor=getattr(teacher.config, "shift_factor", None) or 0.0)


def student_vae(teacher, recipe: DecoderRecipe):
    """The decoder student of ``recipe.arch`` (a width that does not fit fails here, before any other work),
    started from ``recipe.init_from``'s weights when given."""
    if recipe.arch == "tiny":
        student = tiny_vae(teacher, recipe.tiny_channels)
    else:
        channels = [int(c) for c in recipe.channels.split(",")] if recipe.channels else None
        student = prune_vae(teacher, recipe.width, channels)
    if recipe.init_from:
        init_weights(student, recipe.init_from)
    return student


@torch.no_grad()
def init_weights(student: torch.nn.Module, source: str) -> None:
    """Load the weights of the VAE folder or shipped component ``source`` into ``student`` (same architecture)."""
    from ..errors import PocketdiffError
    from ..folder import load_vae
    from ..models.components import resolve_component

    path = resolve_component(source)
    vae = load_vae(path / "vae" if (path / "vae" / "config.json").is_file() else path)
    src, mine = vae.state_dict(), student.state_dict()

    def arch(m) -> dict:  # what the tensors' shapes do not show (e.g. GroupNorm groups); tuples read as lists
        return json.loads(json.dumps({k: v for k, v in dict(m.config).items() if not k.startswith("_")}))
    if type(vae) is not type(student) or arch(vae) != arch(student) or set(src) != set(mine) \
            or any(src[k].shape != mine[k].shape for k in mine):
        raise PocketdiffError(f"{source}: its VAE is not of the student's architecture (arch "
                              f"{type(student).__name__}, channels {vae_channels(student)}); pass the same "
                              "--arch / --channels / --width / --tiny-channels it was trained with")
    student.load_state_dict({k: v.to(mine[k].dtype) for k, v in src.items()})


def vae_channels(vae) -> list[int]:
    cfg = vae.config
    return list(getattr(cfg, "block_out_channels", None) or cfg.decoder_block_out_channels)


def generator_settings(folder: Path, recipe: DecoderRecipe) -> dict:
    """steps / sampler / guidance for the generated latents: the recipe's, else the folder card's defaults."""
    from ..models.registry import model_card, sampling_settings

    chosen = sampling_settings(model_card(folder).get("defaults", {}), recipe.generator_steps or None,
                               recipe.generator_sampler or None, recipe.generator_guidance or None)
    return {"steps": chosen.steps, "sampler": chosen.sampler, "guidance": chosen.guidance}


@torch.no_grad()
def generate_latents(pipe, captions: list[str], settings: dict, seed: int, resolution: int = 64,
                     batch: int = 50) -> torch.Tensor:
    """(n, C, h, w) *unscaled* latents (decoder inputs) sampled by ``pipe`` for ``captions`` at ``resolution``."""
    from tqdm import tqdm

    from ..pipeline import decoder_input

    cfg = pipe.vae.config
    out = []
    for i in tqdm(range(0, len(captions), batch), desc="generated latents", unit="batch"):
        res = pipe(captions[i:i + batch], seed=seed * 100_003 + i, output_type="latent", height=resolution,
                   width=resolution, **settings)
        out.append(decoder_input(res.latents, cfg).cpu())
    return torch.cat(out).float()


def cached_generated(out: Path, folder: Path, pipe, recipe: DecoderRecipe, seed: int, data) -> torch.Tensor:
    """:func:`generate_latents` by ``pipe`` (``folder`` loaded) for captions of ``data``, written atomically to
    ``out`` and reused for the same UNet weights, settings and data. With several processes the main one
    generates and writes first; the others then read its file."""
    from safetensors.torch import load_file

    from ..files import save_tensors, write_text
    from .common import cache_matches, process_state, weights_digest

    settings = generator_settings(folder, recipe)
    key = {"unet_sha256": weights_digest(pipe.unet), "n": recipe.n_generated, "seed": seed, **settings,
           "resolution": recipe.resolution, "data": "shapes" if data.is_shapes else data.digest()}
    path, meta = out / "generated_latents.safetensors", out / "generated_latents.json"
    state = process_state()
    with state.main_process_first():
        if cache_matches(meta, key) is not None and path.is_file():
            return load_file(str(path))["latents"]
        latents = generate_latents(pipe, data.captions(recipe.n_generated, seed), settings, seed, recipe.resolution)
        if state.is_main_process:  # the meta file names the cache's key: written after the latents
            save_tensors({"latents": latents}, path)
            write_text(meta, json.dumps({"key": key}))
    return latents


def decoder_batches(generated: torch.Tensor | None, batch_size: int, fraction: float, seed: int,
                    pool: np.ndarray | None = None):
    """batches(step) -> {"pixels": real images, "latents": generated latents}: a pure function of the step. The
    real images are fresh Shapes renders, or drawn from ``pool`` ((N, H, W, 3) uint8) when given."""
    from ..data.shapes import sample_batch

    n_gen = 0 if generated is None else int(round(batch_size * fraction))

    def batches(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        n_real = max(batch_size - n_gen, 1)
        images = pool[rng.integers(0, len(pool), n_real)] if pool is not None else \
            sample_batch(rng, n_real, split="train")[0]
        batch = {"pixels": to_pixels(images)}
        if n_gen:
            batch["latents"] = generated[torch.from_numpy(rng.integers(0, len(generated), n_gen))]
        return batch

    return batches


def decoder_loss(teacher, recipe: DecoderRecipe):
    """loss(student, batch): the teacher decoder's outputs and posterior as targets (teacher frozen)."""

    def loss_fn(student, batch: dict, step: int):
        x = batch["pixels"]
        with torch.no_grad():
            t_post = teacher.encode(x).latent_dist
            z = t_post.sample()
            if "latents" in batch:
                z = torch.cat([z, batch["latents"]])
            target = teacher.decode(z).sample
        out = student.decode(z).sample
        w = foreground_weights(target, recipe.foreground_weight)  # (B, 1, H, W)
        l1 = weighted_mean((out - target).abs(), w)
        l2 = weighted_mean((out - target).pow(2), w)
        loss = l1 + recipe.l2_weight * l2
        logs = {"l1": float(l1), "l2": float(l2)}
        if recipe.encoder_weight > 0:
            s_out = student.encode(x)
            if hasattr(s_out, "latent_dist"):  # AutoencoderKL: mean and log-variance of the posterior
                s_post = s_out.latent_dist
                enc = (s_post.mean - t_post.mean).pow(2).mean()
                enc = enc + recipe.logvar_weight * (s_post.logvar - t_post.logvar).pow(2).mean()
            else:  # AutoencoderTiny: one latent, matched to the teacher's posterior mean
                enc = (s_out.latents - t_post.mean).pow(2).mean()
            loss = loss + recipe.encoder_weight * enc
            logs["encoder"] = float(enc)
        return loss, logs

    return loss_fn


def real_images(data, n: int, seed: int) -> np.ndarray | None:
    """(n, H, W, 3) uint8 images of a folder or shards, fitted once; None for the Shapes stream (fresh renders)."""
    if data.is_shapes:
        return None
    return np.stack([image for image, _ in data.samples(n, seed)])


def decoder_quality(vae, teacher, n: int, seed: int, held: np.ndarray | None) -> dict:
    """How the pruned ``vae`` reconstructs: on Shapes, the checker and PSNR on ``n`` fresh renders through the
    teacher's encoder and the pruned decoder (``decoder``: what text-to-image uses) and through the pruned VAE
    alone (``vae``); on other data, the PSNR of both on the ``held`` images."""
    if held is None:
        return {"decoder": reconstruction_quality(vae, n, seed=seed, encoder=teacher),
                "vae": reconstruction_quality(vae, n, seed=seed)}
    return {"decoder": {"psnr": psnr(reconstruct(vae, held, teacher), held)},
            "vae": {"psnr": psnr(reconstruct(vae, held), held)}}


def decoder_monitor(teacher, n: int, held: np.ndarray | None = None):
    """:func:`decoder_quality` as monitor metrics: ``all_correct`` (Shapes) or ``psnr`` of the decoder path, and
    the pruned VAE alone's (``vae_all_correct`` / ``vae_psnr``)."""

    def monitor(step: int, student) -> dict:
        if held is not None:
            q = decoder_quality(student, teacher, n, 0, held)
            return {"psnr": q["decoder"]["psnr"], "vae_psnr": q["vae"]["psnr"]}
        dec = reconstruction_quality(student, n, encoder=teacher)
        full = reconstruction_quality(student, n)
        return {"all_correct": dec["all_correct"], "psnr": dec["psnr"], "shape": dec["shape"],
                "vae_all_correct": full["all_correct"]}

    return monitor


def generated_latents(out: Path, g, recipe: DecoderRecipe, seed: int, data) -> torch.Tensor | None:
    """The generator's own latents (cached in ``out``), made on the GPU when there is one; None when unused."""
    from ..pipeline import Pipeline
    from .common import process_device

    if recipe.generated_fraction <= 0:
        return None
    pipe = Pipeline(g.unet, g.vae, g.text_encoder, g.tokenizer, g.scheduler_config, runner="eager")
    if torch.cuda.is_available():
        pipe.to(process_device())  # this rank's GPU
    generated = cached_generated(out, g.folder, pipe, recipe, seed, data)
    pipe.to("cpu")  # the generator is saved with the pruned VAE at the end; the GPU is the training's
    return generated


def write_decoder(out: Path, final, teacher, g, recipe: DecoderRecipe, chosen: dict, teacher_dir: Path,
                  held: np.ndarray | None = None) -> Path:
    """``out/vae`` (the pruned VAE with its reconstruction report) and ``out/model`` (the generator with it)."""
    from ..folder import save_components
    from ..models.registry import model_card
    from .trainer import export_card

    vae_dir = out / "vae"
    final.save_pretrained(vae_dir, safe_serialization=True)
    n = recipe.final_check_n
    quality = {**decoder_quality(final, teacher, n, 4242, held),
               "teacher": decoder_quality(teacher, teacher, n, 4242, held)["vae"]}
    channels = vae_channels(final)
    width = sum(channels) / sum(teacher.config.block_out_channels)
    report = {**export_card(chosen), "arch": recipe.arch, "width": width, "channels": channels,
              "teacher": str(teacher_dir), "generator": str(g.folder), "recipe": asdict(recipe), "quality": quality}
    (vae_dir / "quality.json").write_text(json.dumps(report, indent=2))
    card = {**model_card(g.folder), "vae": {k: v for k, v in report.items() if k != "recipe"}}
    what = f"pruned to channels {channels}" if recipe.arch == "pruned" else \
        f"replaced by a TAESD-style AutoencoderTiny ({channels[0]} channels per block)"
    card["description"] = f"{card.get('description', g.folder.name)}; VAE {what} by data distillation"
    save_components(out / "model", g.unet, final, g.text_encoder, g.tokenizer, g.scheduler_config, overwrite=True,
                    extra_files={"pocketdiff.json": json.dumps(card, indent=2)})
    return out / "model"


def train_decoder(cfg, teacher_dir, recipe: DecoderRecipe | None = None, resume: bool = True) -> Path:
    """Prune and distil the VAE of ``teacher_dir``; writes ``out_dir/vae`` and ``out_dir/model`` (the generator
    model folder with the pruned VAE in place of its own)."""
    from ..data.datasets import open_dataset
    from ..folder import load_vae
    from .common import frozen_dtype, load_teacher, on_device, start_run
    from .trainer import Trainer

    recipe = recipe or DecoderRecipe()
    data = open_dataset(recipe.data, recipe.resolution)  # an empty or unreadable source fails before any load
    teacher_dir = Path(teacher_dir)
    g = load_teacher(Path(recipe.generator) if recipe.generator else teacher_dir)
    teacher = load_vae(teacher_dir / "vae").eval().requires_grad_(False)
    if dict(g.vae.config)["latent_channels"] != teacher.config.latent_channels:
        raise ValueError(f"{g.folder}: its latents do not fit the VAE of {teacher_dir}")
    out = start_run(cfg)
    student = student_vae(teacher, recipe).train()
    pool = real_images(data, recipe.pool_size, cfg.seed)
    n_held = 0 if pool is None else min(recipe.monitor_n, len(pool) // 2)
    train_pool, held = (None, None) if pool is None else (pool[:len(pool) - n_held], pool[len(pool) - n_held:])
    generated = generated_latents(out, g, recipe, cfg.seed, data)
    trainer = Trainer(cfg, student, decoder_loss(teacher, recipe),
                      decoder_batches(generated, cfg.batch_size, recipe.generated_fraction, cfg.seed, train_pool),
                      monitor=decoder_monitor(teacher, recipe.monitor_n, held) if cfg.monitor_every_s > 0 else None)
    device = trainer.accelerator.device
    with on_device(device, teacher, dtype=frozen_dtype(cfg, device)):
        trainer.run(resume=resume)
    if not trainer.accelerator.is_main_process:
        return out / "model"
    final, chosen = trainer.final_model()
    return write_decoder(out, final.cpu().eval(), teacher, g, recipe, chosen, teacher_dir, held)
