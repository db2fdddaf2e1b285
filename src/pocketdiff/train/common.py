"""What every training recipe shares besides the loop: the teacher's parts, the run folder, frozen modules on
the trainer's device, the sampling check, and the export of the final model with its card.

A recipe module holds its config dataclass, its batches and its loss; its ``train_*`` entry point strings them
together with these pieces and :class:`~pocketdiff.train.trainer.Trainer`. Recipes import this module and the
trainer, not each other.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..latents import to_pixels
from ..schedule import NoiseSchedule
from .trainer import TrainConfig, Trainer, export_card

# The per-object and per-scene rates a sampling check reports (and keep_best can select on).
CHECK_METRICS = ("all_correct", "colour", "shape", "size", "present", "background")


@dataclass
class TeacherParts:
    """A loaded model folder's parts, as distillation recipes use them (frozen, on the CPU)."""

    folder: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.scheduler_config)


def load_teacher(folder: str | Path) -> TeacherParts:
    """The UNet, VAE, text encoder, tokenizer and scheduler config of a diffusers folder."""
    from ..folder import load_components

    parts = load_components(folder)
    return TeacherParts(Path(folder), parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                        parts["scheduler_config"])


def student_and_teacher(teacher_dir, student: str, data: str, resolution: int, what: str):
    """(dataset, teacher parts, student parts, the shared noise schedule) of a recipe that distils a student folder:
    the data source is opened first (an empty or unreadable one fails before any load), and the two folders'
    schedules must match."""
    from ..data.datasets import open_dataset
    from ..folder import load_components

    if not student:
        raise ValueError(f"{what} needs a student folder (--student FOLDER)")
    dataset = open_dataset(data, resolution)
    t = load_teacher(teacher_dir)
    parts = load_components(student)
    return dataset, t, parts, matching_schedule(t.scheduler_config, parts["scheduler_config"], student, what)


def start_run(cfg: TrainConfig) -> Path:
    """The run folder (created) and the seeded global RNG of a recipe's model initialisation."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a run folder; pass another --out-dir")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return out


def matching_schedule(teacher_config: dict, student_config: dict, student: str, what: str) -> NoiseSchedule:
    """The teacher's noise schedule with the student's prediction type; the two must share noise levels."""
    student_schedule = NoiseSchedule.from_config(student_config)
    schedule = NoiseSchedule.from_config({**teacher_config, "prediction_type": student_schedule.prediction_type})
    if not (schedule.alphas_cumprod == student_schedule.alphas_cumprod).all():
        raise ValueError(f"{student}: its noise schedule differs from the teacher's; {what} needs the same one")
    return schedule


def process_state():
    """accelerate's per-process state, made as the Trainer's Accelerator makes it (``cpu=True`` without a GPU).

    It is a process-wide singleton fixed by its first construction: a bare ``PartialState()`` made first on a CPU
    machine decides "not distributed", after which ``main_process_first`` waits for no one (every rank built its
    own cache) and the trainer's processes never synchronise."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_device() -> torch.device:
    """This process's own device (accelerate's: GPU k for rank k; the CPU without a GPU), for work done before the
    trainer exists (caches); a bare "cuda" would put every rank on GPU 0."""
    return process_state().device if torch.cuda.is_available() else torch.device("cpu")


def frozen_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype frozen modules (teacher, VAE, text encoder) run in: the mixed-precision dtype on a GPU (half the
    memory; they run under the trainer's autocast anyway), else None (float32, as loaded)."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]


@contextmanager
def on_device(device: torch.device, *modules: torch.nn.Module | None,
              dtype: torch.dtype | None = None) -> Iterator[None]:
    """Frozen modules on the trainer's device (in ``dtype`` if given) for the run, back on the CPU in float32
    after it (for the export)."""
    kept = [m for m in modules if m is not None]
    for m in kept:
        m.to(device, dtype) if dtype is not None else m.to(device)
    try:
        yield
    finally:
        for m in kept:
            m.to("cpu", torch.float32) if dtype is not None else m.cpu()


def check_foreground(weight: float, threshold: float) -> None:
    """The recipes' foreground-weighting options: a non-negative extra weight and a positive threshold."""
    if weight < 0 or threshold <= 0:
        raise ValueError(f"need foreground_weight >= 0 and foreground_threshold > 0, got {weight} and {threshold}")


# ---- latent pools and their batches ----------------------------------------------------------------
@torch.no_grad()
def encode_pool(vae, n: int, seed: int, data=None, batch: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Scaled VAE latents (posterior means) of ``n`` images of ``data`` (a :class:`~pocketdiff.data.datasets.Dataset`;
    default: fresh Shapes renders) and their captions."""
    from ..data.datasets import open_dataset

    data = data if data is not None else open_dataset("shapes")
    lat, caps = [], []
    stream = data.samples(n, seed)
    device = next(vae.parameters()).device
    for _ in tqdm(range(0, n, batch), desc="encoding latent pool", unit="batch"):
        chunk = [s for _, s in zip(range(batch), stream)]
        if not chunk:
            break
        images = np.stack([im for im, _ in chunk])  # (b, H, W, 3) uint8
        lat.append(vae.encode(to_pixels(images).to(device)).latent_dist.mode().cpu() * vae.config.scaling_factor)
        caps += [c for _, c in chunk]
    if getattr(data, "skipped", None):
        tqdm.write(f"{data.source}: skipped {sum(data.skipped.values())} image(s): {dict(data.skipped)}")
    return torch.cat(lat), caps


def weights_digest(module: torch.nn.Module) -> str:
    """A SHA-256 of a module's state (names, dtypes, values): the same weights give the same digest,
    wherever the folder they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_matches(meta_file: Path, key: dict) -> dict | None:
    """The cache's metadata when ``meta_file`` records ``key``; None when there is no cache, and None with a note
    when it was made with other settings (every recipe cache is then built again, never used stale)."""
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    if meta.get("key") == key:
        return meta
    old = meta.get("key") or {}
    changed = sorted(k for k in set(key) | set(old) if old.get(k) != key.get(k))
    tqdm.write(f"{meta_file.parent}: its cache was made with other settings ({', '.join(changed) or 'unreadable'}); "
               "building it again")
    return None


def cached_pool(out: Path, vae, n: int, seed: int, data=None) -> tuple[torch.Tensor, list[str]]:
    """:func:`encode_pool`, stored in ``out`` and reused only for the same VAE weights, size, seed and data (its
    digest: files and fitting; so runs whose teachers share a VAE can share one pool file: copy ``latent_pool.*``).

    With several processes the main one encodes and writes first; the others then read its file.
    """
    from safetensors.torch import load_file

    from ..files import save_tensors, write_text

    key = {"vae_sha256": weights_digest(vae), "n": n, "seed": seed}
    if data is not None and not data.is_shapes:  # the Shapes stream's key stays what it always was
        key["data"] = data.digest()
    pool_file, meta_file = out / "latent_pool.safetensors", out / "latent_pool.json"
    state = process_state()
    with state.main_process_first():
        meta = cache_matches(meta_file, key)
        if meta is not None and pool_file.is_file():
            return load_file(str(pool_file))["latents"], meta["captions"]
        with on_device(process_device(), vae):
            latents, captions = encode_pool(vae, n, seed, data)  # on this process's GPU when there is one
        if state.is_main_process:  # the meta file names the pool's key: written after the pool
            save_tensors({"latents": latents}, pool_file)
            write_text(meta_file, json.dumps({"key": key, "captions": captions}))
    return latents, captions


def latent_batches(latents: torch.Tensor, captions: list[str], tokenizer, batch_size: int, seed: int,
                   caption_dropout: float):
    """batches(step) -> {"latents", "input_ids"}: a pure function of the step (resumable)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]

    def batches(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        input_ids = ids[idx].clone()
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        input_ids[drop] = empty
        return {"latents": latents[idx], "input_ids": input_ids, "seed": seed * 1_000_003 + step}

    return batches


# ---- classifier-free guidance --------------------------------------------------------------------
def guided(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
           w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided output, conditional output) of a UNet: with scales ``w`` (B,), o_u + w (o_c - o_u) from one batched
    call of both branches; with ``w`` None, one conditional call (its output twice)."""
    if w is None:
        out = unet(x, t, encoder_hidden_states=cond).sample
        return out, out
    out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    out_u, out_c = out.chunk(2)  # (B, C, H, W) each
    return out_u + w.view(-1, 1, 1, 1) * (out_c - out_u), out_c


def empty_prompt_states(tokenizer, text_encoder) -> torch.Tensor:
    """(1, L, D) text states of the empty prompt (the unconditional branch of CFG)."""
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(empty.input_ids)[0]


# ---- checks and export ----------------------------------------------------------------------------
def make_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config: dict, runner: str = "eager"):
    """A generation pipeline over modules in memory (eval mode)."""
    from ..pipeline import Pipeline

    return Pipeline(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, scheduler_config, runner=runner)


def check_summary(r: dict) -> dict:
    """The monitor's metrics from an :func:`~pocketdiff.eval.quality.evaluate` result: the overall rates,
    single-object all-correct, and the shape accuracy per asked-for shape (``shape:<name>``)."""
    out = {k: r[k] for k in CHECK_METRICS}
    one = {int(k): v for k, v in r["by_count"].items()}.get(1)
    if one is not None:
        out["one_object"] = one["all_correct"]
    out.update({f"shape:{s}": v["shape"] for s, v in r["by_shape"].items() if v["n"]})
    return out


def sampling_check(vae, tokenizer, scheduler_config: dict, *, n: int, steps: int, sampler: str, guidance: float,
                   text_encoder=None, unet: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m["unet"],
                   enabled: bool = True):
    """``monitor(step, model)``: ``n`` fresh prompts sampled with the model's (EMA) UNet and scored by the checker
    through :func:`~pocketdiff.eval.quality.evaluate` (:func:`check_summary`'s metrics).

    ``text_encoder``: a frozen one for recipes that do not train it (give a CPU copy: checks run on the CPU);
    None takes ``model["text_encoder"]``. ``unet`` picks (or builds, e.g. merges a LoRA) the UNet from the model.
    ``enabled=False`` gives None (no monitor): recipes pass whether checks are on and the data is Shapes, since
    the checker scores Shapes scenes only (on other data there is no best check and the last EMA weights export).
    """
    from ..eval.quality import evaluate

    if not enabled:
        return None

    def monitor(step: int, model) -> dict:
        text = text_encoder if text_encoder is not None else model["text_encoder"]
        pipe = make_pipeline(unet(model), vae, text, tokenizer, scheduler_config)
        r = evaluate(pipe, n=n, steps=steps, sampler=sampler, guidance=guidance, seed=7, batch_size=16,
                     progress=False)
        return check_summary(r)

    return monitor


def uses_shapes_vocabulary(tokenizer) -> bool:
    """True for a tokenizer built on the Shapes caption words (the default models'): each is a token of its own, and
    there are few others (the byte alphabet; an SD-class CLIP vocabulary, 49,408 tokens, has these words too)."""
    from ..data.shapes import VOCABULARY

    vocab = set(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else set()
    words = {w.replace("</w>", "") for w in vocab if w.endswith("</w>")}
    return set(VOCABULARY) <= words and len(vocab) < 2000


def export_model(trainer: Trainer, folder: Path, card: dict, components: Callable[[torch.nn.Module], dict],
                 init_from: str = "") -> Path:
    """Write the final model (:meth:`Trainer.final_model`: the best kept check, else the last EMA weights) as a
    diffusers folder with its card ``pocketdiff.json``; only the main process writes.

    ``components(final)`` returns the folder's parts: ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and
    ``scheduler_config``. The card gains the trained steps and which check was kept (``export_card``).
    """
    from ..folder import save_components

    if not trainer.accelerator.is_main_process:
        return folder
    final, chosen = trainer.final_model()
    parts = components(final.cpu())
    card = {"trained": True, **card, **export_card(chosen, init_from)}
    if uses_shapes_vocabulary(parts["tokenizer"]):  # it can only read Shapes captions: generate warns on others
        card.setdefault("prompt_grammar", "shapes")
    save_components(folder, parts["unet"].cpu().eval(), parts["vae"], parts["text_encoder"].cpu(), parts["tokenizer"],
                    parts["scheduler_config"], overwrite=True,
                    extra_files={"pocketdiff.json": json.dumps(card, indent=2)})
    return folder
