"""The ``pocketdiff`` command: generate, models, bench, train, eval, quantize, export, serve and data (each a small
function that parses, calls the library and prints).

Errors the user can fix print one line (``pocketdiff <cmd>: error: ...``) and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .errors import PocketdiffError, PromptTruncatedWarning
from .images import IMAGE_FORMATS, image_metadata, save_image

JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# Measured here: SD-size UNet steps up to 1.5x faster and far less noisy than with glibc malloc.
JEMALLOC_COMMANDS = ("generate", "bench", "eval")
JEMALLOC_CONF = "oversize_threshold:1,background_thread:false,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2) instead of usage + message."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _one_line_warnings() -> None:
    """Our warnings as 'warning: ...' lines; library chatter (deprecations, log warnings) silenced."""
    import logging

    logging.disable(logging.WARNING)  # libraries' log records below ERROR (ours go through `warnings`)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", category=PromptTruncatedWarning)

    def show(message, category, *_args, **_kwargs):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def maybe_reexec_with_jemalloc(argv: list[str]) -> None:
    """Re-run this process with jemalloc preloaded when it is installed and not loaded yet.

    Off with POCKETDIFF_JEMALLOC=0. Only the allocator changes; results are identical. Inference commands
    only: with its never-purge settings (what makes inference fast), a training run's RSS grew ~75 MB per
    step until the OOM killer stopped it, so ``train`` keeps the system allocator.
    """
    if os.environ.get("POCKETDIFF_JEMALLOC", "1") == "0" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if not argv or argv[0] not in JEMALLOC_COMMANDS:
        return
    lib = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
    if lib is None or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else lib
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env["POCKETDIFF_JEMALLOC"] = "0"  # never loop
    try:
        os.execve(sys.executable, [sys.executable, "-m", "pocketdiff", *argv], env)
    except OSError:
        return


# ---- generate ---------------------------------------------------------------------------------
BACKEND_HELP = ("auto (default): onnxruntime through an ONNX export made once per model and cached (first use: "
                "a note and the export's progress), torch where the call needs it (--device, --vae, tiling, "
                "--runner, int8 folders, another size); torch; onnxruntime: a folder written by `pocketdiff "
                "export --format onnx`")


def _add_generate(sub) -> None:
    from .sampling import SAMPLERS

    p = sub.add_parser("generate", help="text -> PNG images with a local model folder (default: the shipped model)")
    p.add_argument("prompt", nargs="?", help="the prompt (an empty string generates unconditionally)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--model", default="default", help="model folder or shipped model name (see `pocketdiff models`)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model card's, else 25)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampler (default: the model card's, else dpmpp_2m)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: model card's, else 7.5)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (CFG's unconditional branch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="images per UNet batch")
    p.add_argument("--height", type=int, help="image height in pixels (multiple of the VAE factor)")
    p.add_argument("--width", type=int, help="image width in pixels (multiple of the VAE factor)")
    p.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"), help="override the grid spacing")
    p.add_argument("-o", "--output", default=".", help="a .png path (one image) or a folder (default: .)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--runner", choices=("auto", "eager", "trace"), default="auto",
                   help="UNet execution: trace (TorchScript, less overhead), eager, or auto (trace when it pays off)")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickle (.bin/.ckpt) weights: they can run code")
    p.add_argument("--vae", help="a VAE folder to decode with instead of the model's own (e.g. `train decoder`'s OUT/vae), "
                                 "or a shipped one: shapes-vae-pruned (the channel-pruned Shapes VAE: less decode time)")
    p.add_argument("--device", default="cpu", help="torch device to run on: cpu (default), cuda, cuda:N, mps")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto", help=BACKEND_HELP)
    tile = p.add_argument_group("model-level tiling (lower peak memory)")
    tile.add_argument("--attention-chunk", type=int, help="compute attention this many queries at a time")
    tile.add_argument("--vae-tile", type=int, help="decode in overlapping tiles of this many pixels")
    tile.add_argument("--stream-unet", action="store_true",
                      help="keep only the running UNet block's weights in memory (read from disk every step)")
    p.set_defaults(func=cmd_generate)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, help="CPU threads (default: $POCKETDIFF_THREADS, else the cores free now: "
                                             "usable cores less those busy now)")


def _read_prompts(args) -> list[str]:
    prompts: list[str] = []
    if args.prompt is not None:
        prompts.append(args.prompt)
    if args.prompts_file is not None:
        f = args.prompts_file
        if not f.is_file():
            raise PocketdiffError(f"{f}: prompts file not found; pass a text file with one prompt per line")
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PocketdiffError(f"{f}: not UTF-8 text; save it as UTF-8 with one prompt per line") from None
        file_prompts = [line.strip() for line in lines if line.strip()]
        if not file_prompts:
            raise PocketdiffError(f"{f}: holds no prompts; write one prompt per line")
        prompts.extend(file_prompts)
    if not prompts:
        raise PocketdiffError("no prompt given; pass a PROMPT or --prompts-file FILE")
    return prompts


def _slug(text: str, n: int = 40) -> str:
    s = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in s:
        s = s.replace("--", "-")
    return s[:n].rstrip("-") or "unconditional"


MAX_SEED = 2**63 - 1  # torch's and numpy's generators take seeds up to this


def _check_seed(seed: int, total: int) -> None:
    if seed < 0 or seed + total - 1 > MAX_SEED:
        raise PocketdiffError(f"--seed must be between 0 and {MAX_SEED - total + 1} (image k uses seed + k), got {seed}")


def _output_paths(output: str, prompts: list[str], num_images: int, seed: int, overwrite: bool) -> list[Path]:
    """One image path per image; checked before any work so no run is wasted or file lost.

    ``-o`` is an image path (.png, .jpg/.jpeg, .webp; several images get -000, -001, ... suffixes) or a folder
    of PNGs; a trailing slash names a folder to create."""
    out = Path(output)
    total = len(prompts) * num_images
    _check_seed(seed, total)
    folder = str(output).endswith(("/", os.sep))
    if out.suffix and not folder and out.suffix.lower() not in IMAGE_FORMATS and not out.is_dir():
        raise PocketdiffError(f"{out}: {out.suffix} images are not supported; use .png, .jpg or .webp, or a folder")
    if out.suffix.lower() in IMAGE_FORMATS and not folder:
        if not out.parent.exists():
            raise PocketdiffError(f"{out.parent}: output folder does not exist; create it, or end -o with / to "
                                  "have it created")
        paths = [out] if total == 1 else [out.with_name(f"{out.stem}-{k:03d}{out.suffix}") for k in range(total)]
    else:
        if out.exists() and not out.is_dir():
            raise PocketdiffError(f"{out}: exists and is not a folder; give -o an image path or a folder")
        if not out.exists() and folder:
            out.mkdir(parents=True)
        if not out.exists():
            raise PocketdiffError(f"{out}: output folder does not exist; create it, or end -o with / to have it "
                                  "created")
        paths = [out / f"{k:03d}-{_slug(prompts[k // num_images])}-s{seed + k}.png" for k in range(total)]
    for p in paths:
        if p.is_dir():
            raise PocketdiffError(f"{p}: is a folder; choose another -o")
        if p.exists() and not overwrite:
            raise PocketdiffError(f"{p}: already exists; pass --overwrite or choose another -o")
    return paths


def _load_generator(args, folder: Path):
    """The pipeline ``generate`` runs (:func:`pocketdiff.loader.load_generator` with the command's flags)."""
    from .loader import load_generator

    return load_generator(folder, args.model, backend=args.backend, device=args.device, vae=args.vae,
                          runner=args.runner, trust_pickle=args.trust_pickle, threads=args.threads,
                          attention_chunk=args.attention_chunk, vae_tile=args.vae_tile, stream_unet=args.stream_unet,
                          size=(args.height, args.width))


def _warn_outside_grammar(folder: Path, prompts: list[str]) -> None:
    """One warning line per prompt a Shapes model cannot read (its card names the grammar), with the nearest
    valid caption; other models take any prompt."""
    from .data.shapes import grammar_warning
    from .models.registry import model_card

    if model_card(folder).get("prompt_grammar") != "shapes":
        return
    for prompt in dict.fromkeys(prompts):
        message = grammar_warning(prompt)
        if message:
            print(f"warning: {message}", file=sys.stderr)


def _check_generate_args(args) -> None:
    if args.steps is not None and args.steps < 1:
        raise PocketdiffError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise PocketdiffError(f"--guidance must be a finite number, got {args.guidance}")
    if args.num_images < 1 or args.batch_size < 1:
        raise PocketdiffError("--num-images and --batch-size must be >= 1")


def cmd_generate(args) -> int:
    import statistics
    import time

    import torch
    from tqdm import tqdm

    from .models.registry import resolve_model

    prompts = _read_prompts(args)
    _check_generate_args(args)
    paths = _output_paths(args.output, prompts, args.num_images, args.seed, args.overwrite)
    folder = resolve_model(args.model)
    t_load = time.perf_counter()
    pipe = _load_generator(args, folder)
    load_s = time.perf_counter() - t_load
    height, width = pipe.check_size(args.height, args.width)
    pipe.check_memory(height, width, min(args.batch_size, len(prompts) * args.num_images))
    chosen = pipe.settings(args.steps, args.sampler, args.guidance)
    _warn_outside_grammar(folder, prompts)
    jobs = [(k, prompts[k // args.num_images]) for k in range(len(prompts) * args.num_images)]
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    pipe.runner.plan_calls(chosen.steps * len(batches))
    bar = tqdm(total=chosen.steps * len(batches), desc="sampling", unit="step", disable=args.no_progress,
               file=sys.stderr)
    text_s, unet_steps, decode_s, t0 = 0.0, [], 0.0, time.perf_counter()
    for batch in batches:
        gens = [torch.Generator().manual_seed(args.seed + k) for k, _ in batch]
        result = pipe([p for _, p in batch], negative_prompt=args.negative_prompt, steps=chosen.steps,
                      sampler=chosen.sampler, guidance=chosen.guidance, generator=gens, height=args.height,
                      width=args.width, timestep_spacing=args.timestep_spacing, callback=lambda _info: bar.update(1))
        text_s, decode_s = text_s + result.timings.text_encoder, decode_s + result.timings.decoder
        unet_steps += result.timings.unet_steps
        for (k, prompt), image in zip(batch, result.images):
            save_image(image, paths[k], image_metadata(prompt, args.negative_prompt, args.seed + k, chosen,
                                                       str(args.model), image))
    bar.close()
    total, written = time.perf_counter() - t0, len(jobs)
    per_step = statistics.median(unet_steps) if unet_steps else 0.0
    print(f"wrote {written} image(s): {paths[0]}{' ...' if written > 1 else ''}")
    print(chosen.line())
    print(f"backend: {pipe.backend} ({pipe.backend_why})")
    slowest = max(unet_steps) if unet_steps else 0.0  # a stall (a busy CPU) shows here, not in the median
    print(f"timing: load {load_s:.2f} s | text encoder {text_s:.3f} s | UNet {per_step * 1000:.1f} ms/step (slowest "
          f"{slowest * 1000:.1f}) x {chosen.steps} x {len(batches)} batch(es) | decoder {decode_s:.3f} s | total "
          f"{total:.2f} s ({total / written:.3f} s/image) | {args.threads} thread(s) ({args.threads_why})")
    return 0


# ---- models -----------------------------------------------------------------------------------
def _check_json_out(path: Path | None, overwrite: bool) -> None:
    """Fail before any work if a --json path cannot be written, or would replace a file unasked."""
    if path is None:
        return
    if not path.parent.exists():
        raise PocketdiffError(f"{path.parent}: folder does not exist; create it or choose another --json path")
    if path.is_dir():
        raise PocketdiffError(f"{path}: is a folder; give --json a file path")
    if path.exists() and not overwrite:
        raise PocketdiffError(f"{path}: already exists; pass --overwrite or choose another --json path")


def _component_rows() -> list[dict]:
    """The shipped components (VAEs, the domain CLIP) with what their folders measured (quality.json)."""
    from .models.components import shipped_components

    rows = []
    for name, path in shipped_components().items():
        config = json.loads((path / "config.json").read_text())
        report = json.loads((path / "quality.json").read_text()) if (path / "quality.json").is_file() else {}
        rows.append({"name": name, "kind": "component", "class": config.get("_class_name", config.get("class", "")),
                     "path": str(path), "quality": report.get("quality") or report or None})
    return rows


def cmd_models(args) -> int:
    from .models.registry import default_model_name, model_card, shipped_models

    try:
        default = default_model_name()
    except PocketdiffError:
        default = None
    rows = []
    for name, path in shipped_models().items():
        card = model_card(path)
        rows.append({"name": name, "kind": "model", "path": str(path), "default": name == default,
                     "description": card.get("description", ""), "defaults": card.get("defaults", {}),
                     "quality": card.get("quality")})
    components = _component_rows()
    if args.json:
        print(json.dumps(rows + components, indent=2))
        return 0
    for r in rows:
        q = r["quality"] or {}
        score = f"all-correct {100 * q['all_correct']:.1f}%" if "all_correct" in q else "not measured"
        print(f"{r['name']}{' (default)' if r['default'] else ''}\t{score}\t{r['path']}\t{r['description']}")
    for r in components:
        print(f"{r['name']} (component: {r['class']})\t{r['path']}")
    return 0


# ---- bench ------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    from .models.presets import ARCH_PRESETS

    p = sub.add_parser("bench", help="per-component latency, params, MACs and peak memory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model folder or shipped model name (default: the shipped model)")
    src.add_argument("--arch", choices=sorted(ARCH_PRESETS), help="a named architecture preset, random weights")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="images per call (the UNet runs 2x for CFG)")
    p.add_argument("--runs", type=int, default=10, help="timed runs after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs")
    p.add_argument("--per-block", action="store_true",
                   help="time every UNet block alone (ResNet, attention, samplers): a latency lookup table")
    p.add_argument("--lut", type=Path, help="write the UNet's latency lookup table (what removing each block "
                                            "saves, for `pocketdiff search`) to this JSON file")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch", help="the runtime --lut measures")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --lut file")
    _add_threads(p)
    p.set_defaults(func=cmd_bench)


def _bench_unet(args):
    """(unet, resolution, latent factor) of bench's --arch or --model."""
    from .models import presets
    from .models.registry import resolve_model
    from .pipeline import Pipeline

    if args.arch:
        kind = presets.ARCH_PRESETS[args.arch][0]
        if kind != "unet":
            raise PocketdiffError(f"--per-block or --lut needs a UNet; {args.arch} is a {kind}")
        return presets.build(args.arch)[1], args.resolution or 512, 8
    pipe = Pipeline.from_folder(resolve_model(args.model or "default"))
    return pipe.unet, args.resolution or pipe.default_size, pipe.vae_scale_factor


def cmd_bench_lut(args) -> int:
    from .bench.lut import measure_lut

    _check_json_out(args.lut, args.overwrite)
    unet, res, factor = _bench_unet(args)
    lut = measure_lut(unet, runtime=args.runtime, resolution=res, batch=args.batch, runs=args.runs,
                      warmup=args.warmup, latent_factor=factor)
    lut.save(args.lut)
    total = sum(b["saving_ms"] for b in lut.blocks.values())
    print(f"{len(lut.blocks)} blocks, UNet step {lut.total_ms:.2f} ms ({lut.runtime}, {res} px, batch {lut.batch}, "
          f"{lut.threads} thread(s)); removable {total:.2f} ms; wrote {args.lut}")
    return 0


def _check_bench_memory(args) -> None:
    """Refuse a --resolution whose activations cannot fit in memory, before building anything."""
    from .memory import check_fits, decode_bytes, unet_bytes
    from .models import presets

    res, batch = args.resolution, args.batch
    if args.arch:
        kind = presets.ARCH_PRESETS[args.arch][0]
        unet_c = presets.SD15_UNET["block_out_channels"][0] if kind == "unet" else 0
        vae_c = presets.SD15_VAE["block_out_channels"][0] if kind == "vae" else 0
    else:  # the folder's own first-stage widths, from its configs (nothing loaded)
        from .folder import read_json
        from .models.registry import resolve_model

        folder = resolve_model(args.model or "default")
        unet_c = read_json(folder / "unet" / "config.json")["block_out_channels"][0]
        vae_c = read_json(folder / "vae" / "config.json")["block_out_channels"][0]
    needed = max(unet_bytes(int(unet_c), res // 8, res // 8, 2 * batch), decode_bytes(int(vae_c), res, res, batch))
    check_fits(needed, f"a {res} px benchmark", "lower --resolution or --batch")


def cmd_bench(args) -> int:
    from .bench import measure
    from .models import presets
    from .models.registry import resolve_model
    from .pipeline import Pipeline

    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        raise PocketdiffError("--runs and --batch must be >= 1 and --warmup >= 0")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise PocketdiffError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    _check_json_out(args.json, args.overwrite)
    if args.resolution is not None:
        _check_bench_memory(args)
    if args.lut is not None:
        return cmd_bench_lut(args)
    if args.per_block:
        from .bench.blocks import blocks_markdown, per_block_latency

        unet, res, factor = _bench_unet(args)
        rows = per_block_latency(unet, resolution=res, batch=args.batch, runs=args.runs, warmup=args.warmup,
                                 latent_factor=factor)
        print(blocks_markdown(rows))
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    if args.arch:
        kind, module = presets.build(args.arch)
        rows = [measure.bench_component(args.arch, kind, module, resolution=args.resolution or 512, batch=args.batch,
                                        runs=args.runs, warmup=args.warmup)]
    else:
        pipe = Pipeline.from_folder(resolve_model(args.model or "default"))
        print(pipe.settings().line() + " (the UNet row is one step of this guidance)", file=sys.stderr)
        rows = measure.bench_pipeline(pipe, resolution=args.resolution, batch=args.batch, runs=args.runs,
                                      warmup=args.warmup)
    peak = measure.gemm_peak()
    rows = measure.with_peak(rows, peak)
    print(measure.format_table(rows))
    print(f"fp32 GEMM peak here: {peak['gflops']:.1f} GFLOP/s ({peak['size']}^2 matmul, {peak['threads']} thread(s))")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


# ---- eval -------------------------------------------------------------------------------------
def _add_eval(sub) -> None:
    from .sampling import SAMPLERS

    p = sub.add_parser("eval", help="Shapes quality (all-correct and per-attribute accuracy on fresh prompts); with "
                                    "--prompts, FID / IS / CLIP score on your prompts (local weights only)")
    p.add_argument("--model", default="default", help="model folder or shipped model name")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model card's, else 25)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampler (default: the model card's, else dpmpp_2m)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model card's, else 7.5)")
    p.add_argument("--n", type=int, help="number of fresh prompts (default 500); with --prompts, the first N lines "
                                        "(default: all)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line: real-world metrics on these "
                                                "instead of the Shapes checker")
    p.add_argument("--reference", type=Path, help="with --prompts: a folder of real images for FID")
    p.add_argument("--inception", type=Path, help="with --prompts: FID Inception-v3 weights (.safetensors) for FID "
                                                  "and IS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--clip", default=None,
                   help="a domain-CLIP folder (`train clip` writes OUT/clip) for CLIP score and FD (default: the "
                        "shipped shapes-clip if present, else n/a); with --prompts, a transformers CLIP folder")
    p.add_argument("--vae", help="a VAE folder to decode with instead of the model's own, or a shipped one (shapes-vae-pruned)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto", help=BACKEND_HELP)
    p.add_argument("--json", type=Path, help="write the full summary here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true")
    _add_threads(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .eval.quality import MARKDOWN_HEADER, evaluate, markdown_row

    if (args.n is not None and args.n < 1) or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise PocketdiffError("--n, --steps and --batch-size must be >= 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise PocketdiffError(f"--guidance must be a finite number, got {args.guidance}")
    _check_json_out(args.json, args.overwrite)
    if args.prompts is not None:
        return _eval_prompts(args)
    if args.reference is not None or args.inception is not None:
        raise PocketdiffError("--reference and --inception go with --prompts FILE (FID on your prompts)")
    args.n = args.n or 500
    from .eval.clip import load_domain_clip

    clip = load_domain_clip(args.clip)
    from .data.shapes import IMAGE_SIZE

    pipe = _eval_pipeline(args, IMAGE_SIZE)  # the Shapes checker scores 64 px renders
    chosen = pipe.settings(args.steps, args.sampler, args.guidance)
    r = evaluate(pipe, n=args.n, steps=chosen.steps, sampler=chosen.sampler, guidance=chosen.guidance, seed=args.seed,
                 batch_size=args.batch_size, progress=not args.no_progress, clip=clip)
    r["model"] = str(args.model)
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=2))
    print(MARKDOWN_HEADER)
    print(markdown_row(str(args.model), r))
    print(chosen.line())
    return 0


def _eval_pipeline(args, size: int | None = None):
    """The model ``eval`` samples (``size``: the pixels it generates at; None: the model's own)."""
    from .loader import load_generator
    from .models.registry import resolve_model

    return load_generator(resolve_model(args.model), args.model, backend=args.backend, vae=args.vae,
                          threads=args.threads, size=(size, size))


def _eval_prompts(args) -> int:
    """``eval --prompts``: FID / IS (with --inception, FID also needs --reference) and CLIP score (with a
    transformers --clip folder) of one image per prompt; every input is checked before the model loads."""
    from .eval.inception import load_inception
    from .eval.realworld import (HFClip, generate_for_prompts, is_transformers_clip, read_prompts, realworld_metrics,
                                 reference_images)

    prompts = read_prompts(args.prompts)[:args.n]
    if args.clip is not None and not is_transformers_clip(args.clip):
        raise PocketdiffError(f"{args.clip}: not a transformers CLIP folder (config.json with model_type \"clip\")")
    if args.reference is None and args.inception is None and args.clip is None:
        raise PocketdiffError("--prompts needs a metric: --reference DIR --inception FILE (FID, IS) and/or --clip DIR")
    inception = load_inception(args.inception) if (args.inception or args.reference) else None
    reference = reference_images(args.reference) if args.reference is not None else None
    clip = HFClip(args.clip) if args.clip is not None else None
    pipe = _eval_pipeline(args)
    chosen = pipe.settings(args.steps, args.sampler, args.guidance)
    images, spi = generate_for_prompts(pipe, prompts, steps=chosen.steps, sampler=chosen.sampler,
                                       guidance=chosen.guidance, seed=args.seed, batch_size=args.batch_size,
                                       progress=not args.no_progress)
    r = {"model": str(args.model), "prompts": str(args.prompts), "steps": chosen.steps, "sampler": chosen.sampler,
         "guidance": chosen.guidance, "seconds_per_image": spi,
         **realworld_metrics(images, prompts, reference=reference, inception=inception, clip=clip)}
    if args.json is not None:
        from .files import write_text

        write_text(args.json, json.dumps(r, indent=2))
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    print(chosen.line())
    return 0


# ---- quantize ---------------------------------------------------------------------------------
def _add_quantize(sub) -> None:
    from .quant import MODES, RUNTIMES

    p = sub.add_parser("quantize", help="int8 UNet weights per output channel: the UNet file ~4x smaller than "
                                        "float32 (1.9x than the shipped float16 ones)")
    p.add_argument("src", help="model folder or shipped model name")
    p.add_argument("-o", "--output", required=True, help="the quantized model folder to write")
    p.add_argument("--mode", choices=list(MODES), default="weight_only",
                   help="weight_only: activations stay float (W8A16/W8A32); dynamic: Linear activations int8 per call")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="int8",
                   help="after loading: int8 (int8 in memory, dequantized per call), dequant (float once at load), "
                        "torchao (torchao int8 Linear kernels)")
    p.add_argument("--max-error", type=float, default=0.05,
                   help="fail if the UNet output moves more than this (relative L2; default 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .models.registry import resolve_model
    from .quantize import quantize_folder

    if not math.isfinite(args.max_error) or args.max_error <= 0:
        raise PocketdiffError(f"--max-error must be a positive number, got {args.max_error}")
    dest = quantize_folder(resolve_model(args.src), args.output, mode=args.mode, runtime=args.runtime,
                           overwrite=args.overwrite, max_rel_error=args.max_error)
    report = json.loads((dest / "pocketdiff.json").read_text())["quantization"]
    for name, r in report["components"].items():
        print(f"{name}: {r['modules']} layers int8 ({report['method']}), {r['bytes_before'] / 1e6:.2f} MB -> "
              f"{r['bytes_after'] / 1e6:.2f} MB ({r['bytes_before'] / r['bytes_after']:.2f}x smaller), "
              f"output error {r['rel_error']:.2%}")
    print(f"wrote {dest}")
    return 0


# ---- export -----------------------------------------------------------------------------------
def _add_export(sub) -> None:
    from .export import EXPORTERS

    p = sub.add_parser("export", help="text encoder, UNet and VAE decoder as deployable artefacts + manifest.json")
    p.add_argument("src", help="model folder or shipped model name")
    p.add_argument("-o", "--output", required=True, help="the new folder to write")
    p.add_argument("--format", choices=sorted(EXPORTERS), default="onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (onnx format only; default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_model
    from .models.registry import resolve_model

    if args.format != "onnx" and args.opset is not None:
        raise PocketdiffError(f"--opset applies to the onnx format only, not {args.format}")
    options = {"opset": args.opset or 18} if args.format == "onnx" else {}
    manifest = export_model(resolve_model(args.src), args.output, args.format, overwrite=args.overwrite, **options)
    for name, c in manifest["components"].items():
        par = c.get("parity", {})
        psnr = "exact" if par.get("psnr_db") is None else f"PSNR {par['psnr_db']} dB"
        check = par["skipped"] if "skipped" in par else f"max abs {par.get('max_abs', float('nan')):.2e}, {psnr}"
        print(f"{name}: {c['file']} | parity vs torch: {check}")
    print(f"wrote {args.output}")
    return 0


# ---- train ------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    from .config import add_flags
    from .train.registry import RECIPES
    from .train.trainer import TrainConfig

    train = sub.add_parser("train", help="training recipes (resumable; Ctrl-C saves a checkpoint)")
    recipes = train.add_subparsers(dest="recipe", required=True, parser_class=_Parser)
    for name, spec in RECIPES.items():
        p = recipes.add_parser(name, help=spec.help, description=spec.help)
        if spec.needs_teacher:
            p.add_argument("--teacher", required=True, help="teacher model folder or shipped model name")
        p.set_defaults(func=cmd_train, train_fields=add_flags(p, TrainConfig, spec.defaults),
                       recipe_fields=add_flags(p, spec.config))
        p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
        _add_threads(p)


def cmd_train(args) -> int:
    from .train.registry import RECIPES, run_recipe
    from .train.trainer import TrainConfig

    spec = RECIPES[args.recipe]
    try:
        cfg = TrainConfig(**{k: getattr(args, k) for k in args.train_fields})
        recipe = spec.config(**{k: getattr(args, k) for k in args.recipe_fields})
        # recipes raise ValueError for inputs that do not fit (wrong student, a checkpoint of another model)
        out = run_recipe(args.recipe, cfg, recipe, getattr(args, "teacher", None), resume=not args.no_resume)
    except (TypeError, ValueError) as e:
        raise PocketdiffError(str(e)) from None
    print(f"wrote {out}")
    return 0


# ---- data -------------------------------------------------------------------------------------
# ---- surgery ----------------------------------------------------------------------------------
def _add_surgery(sub) -> None:
    from .blocks.ops import OPS

    p = sub.add_parser("surgery", help="MobileDiffusion's block operations on a model folder's UNet (weights carried "
                                       "over where they can be): writes a new folder to fine-tune (train kd --student)")
    p.add_argument("src", help="model folder or shipped model name")
    p.add_argument("out", help="the new folder to write")
    p.add_argument("--op", action="append", required=True, choices=OPS,
                   help="an operation, in order (repeatable): " + ", ".join(OPS))
    p.add_argument("--blocks", default="all", help="comma-separated UNet block name prefixes the operations touch")
    p.add_argument("--trim-ratio", type=float, default=0.5, help="trim_ff: the inner width kept")
    p.set_defaults(func=cmd_surgery)


def cmd_surgery(args) -> int:
    from .blocks.ops import apply_ops
    from .folder import load_components, save_components
    from .models.registry import resolve_model

    out = Path(args.out)
    if out.exists():
        raise PocketdiffError(f"{out}: already exists; choose another OUT")
    folder = resolve_model(args.src)
    parts = load_components(folder)
    unet = parts["unet"].float()
    before = sum(p.numel() for p in unet.parameters())
    blocks = "all" if args.blocks == "all" else [b.strip() for b in args.blocks.split(",") if b.strip()]
    specs = [{"op": op, "blocks": blocks, **({"ratio": args.trim_ratio} if op == "trim_ff" else {})} for op in args.op]
    try:
        apply_ops(unet, specs)
    except ValueError as e:
        raise PocketdiffError(str(e)) from None
    card = json.loads((folder / "pocketdiff.json").read_text()) if (folder / "pocketdiff.json").is_file() else {}
    card.update(description=f"{folder.name} with block operations {', '.join(args.op)} (not fine-tuned)",
                block_ops=specs)
    save_components(out, unet, parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler_config"],
                    extra_files={"pocketdiff.json": json.dumps(card, indent=2)})
    after = sum(p.numel() for p in unet.parameters())
    print(f"UNet {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters; wrote {out} (fine-tune it: "
          f"pocketdiff train kd --student {out} ...)")
    return 0


# ---- search -----------------------------------------------------------------------------------
def _add_search(sub) -> None:
    p = sub.add_parser("search", help="architecture evolution (SnapFusion): remove the UNet blocks that cost the "
                                      "least quality per ms saved until a latency target; writes OUT/model")
    p.add_argument("model", help="a (robustly trained: `train ... --skip-prob`) model folder or shipped name")
    p.add_argument("--out", required=True, help="new folder: model/, lut.json, search.jsonl, search.json")
    p.add_argument("--target-ms", type=float, default=0.0, help="latency target of one UNet step, in ms")
    p.add_argument("--target-ratio", type=float, default=0.0,
                   help="latency target as a fraction of the input UNet's measured step (e.g. 0.39)")
    p.add_argument("--lut", default="", help="a latency table from `pocketdiff bench --lut` (default: measure one)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="the runtime of a table measured here")
    p.add_argument("--kinds", default="all", help="blocks to search over: all | attention | resnet | name prefixes")
    p.add_argument("--actions-per-round", type=int, default=1, help="actions executed per round")
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--keep-attention", type=int, default=0,
                   help="never remove the last N transformer blocks (keeps the UNet reading the text)")
    p.add_argument("--val-n", type=int, default=128, help="validation latents of the quality proxy")
    p.add_argument("--foreground-weight", type=float, default=4.0, help="object weight of the proxy's loss")
    p.add_argument("--data", default="shapes", help="the proxy's images: shapes, an image folder or tar shards")
    p.add_argument("--resolution", type=int, default=0, help="the table's image size (default: the model's)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="robust-training steps before each round (SnapFusion's interleaving; 0: search as trained)")
    p.add_argument("--skip-prob", type=float, default=0.1, help="those steps' skip probability per kept block")
    p.add_argument("--train-lr", type=float, default=2e-5, help="those steps' learning rate (constant)")
    _add_threads(p)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from .search.run import SearchJob, run_search

    job = SearchJob(args.model, args.out, args.target_ms, args.target_ratio, args.lut, args.runtime, args.kinds,
                    args.actions_per_round, args.max_rounds, args.val_n, args.foreground_weight, args.data,
                    args.resolution, keep_attention=args.keep_attention, train_steps=args.train_steps,
                    skip_prob=args.skip_prob, train_lr=args.train_lr)
    s = run_search(job)
    measured = f", measured {s['measured_ms_torch']:.2f} ms" if s["measured_ms_torch"] else ""
    print(f"removed {len(s['removed'])} blocks in {s['rounds']} rounds: predicted {s['predicted_ms']:.2f} ms"
          f"{measured} (target {s['target_ms']:.2f}); proxy {s['proxy_before']:.4f} -> {s['proxy_after']:.4f}; "
          f"params {s['params'] / 1e6:.2f}M -> {s['params_after'] / 1e6:.2f}M; wrote {args.out}/model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = _Parser(prog="pocketdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pocketdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    p = sub.add_parser("models", help="list the model folders shipped with pocketdiff")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    _add_bench(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_quantize(sub)
    _add_export(sub)
    _add_search(sub)
    _add_surgery(sub)
    from .serve.cli import add_serve

    add_serve(sub, _add_threads)
    from .datacli import add_data

    add_data(sub, _add_threads, _Parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):
            from .threads import apply_threads

            args.threads, args.threads_why = apply_threads(args.threads)
        return int(args.func(args) or 0)
    except PocketdiffError as e:
        return _fail(f"pocketdiff {args.command}", str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry: preload jemalloc when available, then run."""
    maybe_reexec_with_jemalloc(sys.argv[1:])
    sys.exit(main())
