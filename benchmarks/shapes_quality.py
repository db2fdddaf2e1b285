"""Measure the Shapes VAE and teacher, writing docs/results/shapes_vae.json and shapes_teacher.json.

    python benchmarks/shapes_quality.py vae [--vae FOLDER] [--n 1000]
    python benchmarks/shapes_quality.py teacher [--model default] [--n 500] [--sweep-n 200] [--log RUN/log.jsonl]
    python benchmarks/shapes_quality.py decoder --vae PRUNED_VAE [--teacher-vae DIR] [--n 1000]
    python benchmarks/shapes_quality.py ratios --model default --n 96 --out shapes_ratios_v1.json

The teacher is measured as the issue asks: 50 DDIM steps, a sweep of guidance scales on ``--sweep-n``
fresh prompts, then the best scale on ``--n`` fresh prompts (other seeds than the sweep), and the UNet's
object-pixel loss over the Bayes-optimal denoiser's per timestep (``pocketdiff.eval.bayes``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
sys.path.insert(0, str(ROOT / "src"))

from pocketdiff.bench.measure import bench_component, count_params  # noqa: E402
from pocketdiff.eval.quality import evaluate  # noqa: E402
from pocketdiff.models.registry import resolve_model  # noqa: E402


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20


def measure_vae(vae_dir: Path, n: int) -> dict:
    from diffusers import AutoencoderKL

    from pocketdiff.train.autoencoder import reconstruction_quality

    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    q = reconstruction_quality(vae, n=n, seed=4242, split="all")
    return {"name": vae_dir.parent.name if vae_dir.name == "vae" else vae_dir.name, "n": n,
            "params": count_params(vae), **q}


def measure_decoders(teacher_dir: Path, vae_dirs: list[Path], n: int, batch: int = 25, rounds: int = 15) -> dict:
    """Pruned decoders vs the teacher VAE's: params and MACs of one decode, its time at ``batch`` (calls
    interleaved across VAEs, medians), and the checker on reconstructions of ``n`` fresh renders through the
    teacher's encoder (what text-to-image uses: the decoder alone) and through each VAE's own encoder."""
    import time

    import torch
    from diffusers import AutoencoderKL

    from pocketdiff.bench.measure import component_call, count_macs
    from pocketdiff.train.autoencoder import reconstruction_quality

    dirs = [teacher_dir, *vae_dirs]
    vaes = [AutoencoderKL.from_pretrained(str(d), local_files_only=True).eval() for d in dirs]
    teacher = vaes[0]
    calls = [component_call("vae", v, resolution=64, batch=batch, latent_factor=4) for v in vaes]
    times: list[list[float]] = [[] for _ in vaes]
    with torch.no_grad():
        for r in range(rounds + 2):
            for i, (fn, inputs) in enumerate(calls):
                t0 = time.perf_counter()
                fn(*inputs)
                if r >= 2:  # two warm-up rounds
                    times[i].append(time.perf_counter() - t0)
    rows = []
    for d, v, t in zip(dirs, vaes, times):
        fn, inputs = component_call("vae", v, resolution=64, batch=1, latent_factor=4)
        decoder_params = count_params(v.decoder) + count_params(v.post_quant_conv)
        report = json.loads((d / "quality.json").read_text()) if (d / "quality.json").is_file() else {}
        rows.append({"name": d.parent.name if d.name == "vae" else d.name, "folder": str(d),
                     "width": report.get("width", 1.0), "steps": report.get("steps_trained"),
                     "channels": list(v.config.block_out_channels), "decoder_params": decoder_params,
                     "decoder_gmacs": count_macs(fn, *inputs) / 1e9, "decode_ms": 1e3 * sorted(t)[len(t) // 2],
                     "decoder": reconstruction_quality(v, n, seed=4242, encoder=teacher),
                     "vae": reconstruction_quality(v, n, seed=4242)})
        print(f"{rows[-1]['name']}: {rows[-1]['decode_ms']:.1f} ms, decoder all-correct "
              f"{rows[-1]['decoder']['all_correct']:.3f}", file=sys.stderr, flush=True)
    return {"n": n, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(), "rows": rows}


def learning_curve(log: Path | None, batch_size: int | None) -> list[dict]:
    """The monitor checks of a training run's log.jsonl (step, samples seen, and the check's metrics)."""
    if log is None:
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "samples": r["step"] * batch_size if batch_size else None, **r["monitor"]}
            for r in rows if "monitor" in r]


def measure_ratios(pipe, n: int) -> dict:
    """Object-pixel v-loss of the UNet over the Bayes-optimal denoiser's, per timestep (single-object scenes)."""
    from pocketdiff.eval.bayes import object_loss_ratios, single_object_scenes

    return {"n": n, "by_t": object_loss_ratios(pipe, single_object_scenes(n, seed=77))}


def measure_teacher(model: str, n: int, sweep_n: int, guidances: list[float], steps: int,
                    clip_dir: str | None = None, ratio_n: int = 96) -> dict:
    from pocketdiff.eval.clip import load_domain_clip
    from pocketdiff.pipeline import Pipeline

    clip = load_domain_clip(clip_dir)

    folder = resolve_model(model)
    pipe = Pipeline.from_folder(folder)
    row = bench_component("unet", "unet", pipe.unet, resolution=pipe.default_size, batch=1, runs=20, warmup=3,
                          latent_factor=pipe.vae_scale_factor, seq_len=pipe.tokenizer.model_max_length)
    info = {"unet_params": count_params(pipe.unet), "text_params": count_params(pipe.text_encoder),
            "vae_params": count_params(pipe.vae), "unet_gmacs": row["gmacs"], "unet_ms": row["median_ms"],
            "size_mb": folder_mb(folder)}
    sweep = []
    for g in guidances:
        r = evaluate(pipe, n=sweep_n, steps=steps, sampler="ddim", guidance=g, seed=1000, clip=clip)
        sweep.append(r)
        print(f"guidance {g}: all-correct {r['all_correct']:.3f}", file=sys.stderr, flush=True)
    best_g = max(sweep, key=lambda r: r["all_correct"])["guidance"]
    best = evaluate(pipe, n=n, steps=steps, sampler="ddim", guidance=best_g, seed=0, clip=clip)
    card = json.loads((folder / "pocketdiff.json").read_text()) if (folder / "pocketdiff.json").is_file() else {}
    return {"name": folder.name, "folder": str(folder), "model": info, "sweep": sweep, "best": best,
            "steps_trained": card.get("steps_trained"), "object_loss_ratios": measure_ratios(pipe, ratio_n)}


def write_card(folder: Path, r: dict) -> None:
    """Store the measured table in the model folder: pocketdiff.json (defaults, quality) and README.md."""
    from pocketdiff.eval.quality import MARKDOWN_HEADER, card_quality, markdown_row

    card_file = folder / "pocketdiff.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    best = r["best"]
    card.setdefault("defaults", {}).update({"guidance": best["guidance"]})
    card["quality"] = card_quality(best)
    card["model"] = r["model"]
    card_file.write_text(json.dumps(card, indent=2, default=float))
    rows = "\n".join(markdown_row(folder.name, x) for x in [best] + r["sweep"])
    (folder / "README.md").write_text(
        f"# {folder.name}\n\n{card.get('description', '')}\n\nMeasured by `python benchmarks/shapes_quality.py "
        f"teacher --write-card` (first row: the best guidance on {best['n']} fresh prompts; then the sweep):\n\n"
        f"{MARKDOWN_HEADER}\n{rows}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vae")
    v.add_argument("--vae", type=Path, default=None, help="VAE folder (default: the default model's vae/)")
    v.add_argument("--n", type=int, default=1000)
    v.add_argument("--write-card", action="store_true", help="store the results as the VAE folder's README.md")
    d = sub.add_parser("decoder")
    d.add_argument("--vae", type=Path, nargs="+", required=True, help="pruned VAE folders (`train decoder` OUT/vae)")
    d.add_argument("--teacher-vae", type=Path, default=None, help="default: the default model's vae/")
    d.add_argument("--n", type=int, default=1000)
    r = sub.add_parser("ratios", help="only the object-loss ratios to the Bayes-optimal denoiser")
    r.add_argument("--model", default="default")
    r.add_argument("--n", type=int, default=96)
    r.add_argument("--out", required=True, help="file name under docs/results/")
    t = sub.add_parser("teacher")
    t.add_argument("--model", default="default")
    t.add_argument("--n", type=int, default=500)
    t.add_argument("--sweep-n", type=int, default=200)
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0])
    t.add_argument("--clip", default=None, help="domain-CLIP folder (default: the shipped shapes-clip, if any)")
    t.add_argument("--write-card", action="store_true", help="store the results in the model folder's card")
    t.add_argument("--ratio-n", type=int, default=96, help="single-object scenes for the Bayes-optimal loss ratios")
    t.add_argument("--log", type=Path, default=None, help="the run's log.jsonl: its checks become the learning curve")
    t.add_argument("--batch-size", type=int, default=None, help="the run's batch size (samples = steps x this)")
    t.add_argument("--out", default="shapes_teacher.json", help="file name under docs/results/")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "vae":
        vae_dir = args.vae or resolve_model("default") / "vae"
        r = measure_vae(vae_dir, args.n)
        (RESULTS / "shapes_vae.json").write_text(json.dumps(r, indent=2))
        if args.write_card:
            (vae_dir / "README.md").write_text(
                f"# {r['name']}\n\nThe Shapes AutoencoderKL (64x64 RGB -> 16x16x4), trained by `pocketdiff train vae`. "
                f"Reconstructions of {r['n']} fresh renders, scored by the Shapes checker (measured by "
                f"`python benchmarks/shapes_quality.py vae --write-card`):\n\n"
                f"| PSNR dB | all-correct % | colour % | shape % | size % | background % | no extra % |\n"
                f"|---|---|---|---|---|---|---|\n| {r['psnr']:.2f} | {100 * r['all_correct']:.1f} | "
                f"{100 * r['colour']:.1f} | {100 * r['shape']:.1f} | {100 * r['size']:.1f} | "
                f"{100 * r['background']:.1f} | {100 * r['no_extra']:.1f} |\n\ndocs/SHAPES.md's gate for training a UNet "
                f"on these latents is >= 97% all-correct.\n")
    elif args.what == "ratios":
        from pocketdiff.pipeline import Pipeline

        folder = resolve_model(args.model)
        r = {"name": folder.name, "folder": str(folder), **measure_ratios(Pipeline.from_folder(folder), args.n)}
        (RESULTS / args.out).write_text(json.dumps(r, indent=2))
    elif args.what == "decoder":
        r = measure_decoders(args.teacher_vae or resolve_model("default") / "vae", args.vae, args.n)
        (RESULTS / "shapes_decoder.json").write_text(json.dumps(r, indent=2))
    else:
        r = measure_teacher(args.model, args.n, args.sweep_n, args.guidance, args.steps, args.clip, args.ratio_n)
        r["learning_curve"] = learning_curve(args.log, args.batch_size)
        (RESULTS / args.out).write_text(json.dumps(r, indent=2, default=float))
        if args.write_card:
            write_card(Path(r["folder"]), r)
    print(json.dumps(r if args.what in ("vae", "decoder", "ratios") else r["best"], indent=2, default=float)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
