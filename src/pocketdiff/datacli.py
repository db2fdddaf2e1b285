"""``pocketdiff data ...``: write Shapes sets (clean or deliberately dirty), curate an image-caption set, and
generate teacher pairs. Each command writes a new folder whole, or nothing."""

from __future__ import annotations

from pathlib import Path

from .errors import PocketdiffError


def add_data(sub, add_threads, parser_class) -> None:
    data = sub.add_parser("data", help="write, curate and synthesize training data").add_subparsers(
        dest="dataset", required=True, parser_class=parser_class)
    _add_shapes(data)
    _add_curate(data, add_threads)
    _add_synth(data, add_threads)


def _add_shapes(data) -> None:
    p = data.add_parser("shapes", help="Shapes image/caption pairs (imagefolder: PNGs + metadata.jsonl, or tar shards)")
    p.add_argument("--format", choices=("imagefolder", "webdataset"), default="imagefolder",
                   help="imagefolder: PNGs + metadata.jsonl; webdataset: tar shards of png + txt")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (webdataset)")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "heldout", "all"), default="train")
    p.add_argument("--dirty", action="store_true",
                   help="web-data faults at documented rates (duplicates, small and upscaled images, off-centre "
                        "crops, wrong and miscounted captions; see pocketdiff.data.dirty); the truth in dirty.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data_shapes)


def cmd_data_shapes(args) -> int:
    from .data.shapes import write_dataset, write_shards

    if args.n < 1:
        raise PocketdiffError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if not out.parent.exists():
        raise PocketdiffError(f"{out.parent}: folder does not exist; create it first")
    try:
        if args.dirty:
            if args.format != "imagefolder" or args.split != "train":
                raise PocketdiffError("--dirty writes an imagefolder of the train split; drop --format/--split")
            from .data.dirty import write_dirty

            counts = write_dirty(out, args.n, seed=args.seed, progress=not args.no_progress)
            print("faults: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        elif args.format == "webdataset":
            if args.shard_size < 1:
                raise PocketdiffError(f"--shard-size must be >= 1, got {args.shard_size}")
            write_shards(out, args.n, seed=args.seed, split=args.split, shard_size=args.shard_size,
                         progress=not args.no_progress)
        else:
            write_dataset(out, args.n, seed=args.seed, split=args.split, progress=not args.no_progress)
    except FileExistsError:
        raise PocketdiffError(f"{out}: already exists and is not empty; choose another --out") from None
    print(f"wrote {args.n} image/caption pairs to {out}")
    return 0


def _add_agreement(p, add_threads) -> None:
    """The flags curate and synth share: the agreement filter, progress and threads."""
    p.add_argument("--scorer", default="", help="text-image agreement scorer: shapes (the domain CLIP) or a local "
                                               "CLIP folder")
    p.add_argument("--min-score", type=float, help="drop pairs the scorer rates under this")
    p.add_argument("--no-progress", action="store_true")
    add_threads(p)


def _check_agreement(args) -> None:
    if args.min_score is not None and not args.scorer:
        raise PocketdiffError("--min-score needs a --scorer (shapes or a CLIP folder)")


def _add_curate(data, add_threads) -> None:
    p = data.add_parser("curate", help="deduplicate, filter, fit, recaption and agreement-filter an image-caption "
                                       "folder or tar shards into a new folder, with a report and a contact sheet")
    p.add_argument("source", help="an image folder (metadata.jsonl or .txt captions) or tar shards (path/glob)")
    p.add_argument("out", help="the new folder to write")
    p.add_argument("--no-dedup", action="store_true", help="keep duplicates")
    p.add_argument("--hash-threshold", type=int, default=64,
                   help="colour perceptual-hash bits (of 768) within which images are near-duplicates")
    p.add_argument("--min-size", type=int, default=0, help="drop images whose short side is under this (px)")
    p.add_argument("--max-aspect", type=float, default=0.0, help="drop images longer than this aspect ratio")
    p.add_argument("--resolution", type=int, default=0, help="centre crop and resize to this many px")
    p.add_argument("--captioner", default="", help="shapes (the analytic Shapes captioner) or a local "
                                                   "transformers image-to-text folder")
    p.add_argument("--caption-mode", choices=("keep", "replace", "merge"), default="keep",
                   help="keep: fill missing captions only; replace; merge: append the new caption")
    _add_agreement(p, add_threads)
    p.set_defaults(func=cmd_data_curate)


def cmd_data_curate(args) -> int:
    from .data.curate import CurateConfig, curate
    from .eval.captioners import make_captioner, make_scorer

    _check_agreement(args)
    if not Path(args.source).exists() and not any(c in args.source for c in "*?{["):
        raise PocketdiffError(f"{args.source}: no such folder or shards")
    cfg = CurateConfig(not args.no_dedup, args.hash_threshold, args.min_size, args.max_aspect, args.resolution,
                       args.caption_mode, args.min_score)
    report = curate(args.source, args.out, cfg, make_captioner(args.captioner), make_scorer(args.scorer),
                    progress=not args.no_progress)
    c = report["counts"]
    print(f"{c['input']} in: {c['kept']} kept, {c['changed']} changed, {c['dropped']} dropped")
    for reason, n in sorted(report["by_reason"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason}: {n}")
    print(f"wrote {args.out} (report.json, report.html)")
    return 0


def _add_synth(data, add_threads) -> None:
    p = data.add_parser("synth", help="teacher-generated image-caption pairs for a prompts file (resumable)")
    p.add_argument("out", help="the new folder to write (resumes OUT.partial)")
    p.add_argument("--teacher", required=True, help="model folder or shipped model name")
    p.add_argument("--prompts", required=True, help="a text file with one prompt per line")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i gets seed + i")
    p.add_argument("--batch", type=int, default=16)
    _add_agreement(p, add_threads)
    p.set_defaults(func=cmd_data_synth)


def cmd_data_synth(args) -> int:
    from .eval.captioners import make_scorer
    from .eval.realworld import read_prompts
    from .loader import load_generator
    from .models.registry import resolve_model
    from .synth import SynthConfig, synthesize

    _check_agreement(args)
    if args.steps < 1 or args.batch < 1:
        raise PocketdiffError("--steps and --batch must be >= 1")
    if Path(args.out).exists():
        raise PocketdiffError(f"{args.out}: already exists; choose another OUT")
    prompts = read_prompts(args.prompts)
    folder = resolve_model(args.teacher)
    pipe = load_generator(folder, args.teacher, threads=args.threads)
    cfg = SynthConfig(args.steps, args.sampler, args.guidance, args.seed, args.batch, args.min_score)
    report = synthesize(pipe, prompts, str(args.prompts), args.out, cfg, make_scorer(args.scorer),
                        progress=not args.no_progress)
    print(f"{report['generated']} generated, {report['kept']} kept; wrote {args.out}")
    return 0
