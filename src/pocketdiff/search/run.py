"""``pocketdiff search``: a model folder in, a searched model folder out (SnapFusion's architecture evolution).

OUT holds ``lut.json`` (the latency table used: given with ``--lut`` or measured here), ``search.jsonl`` (one line
per round, written as the search goes), ``robust_log.jsonl`` (with ``--train-steps``: the loss log of the robust
training between rounds, :mod:`pocketdiff.search.robust`), ``search.json`` (the summary: target, removed blocks, predicted and
measured latency, proxy before and after) and ``model/``: the input folder with its UNet's searched blocks
removed (:mod:`pocketdiff.blocks.surgery`), which pocketdiff loads at the searched cost and stock diffusers loads
as the same function at the full cost. OUT is written at the end, as a whole; an existing OUT is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PocketdiffError


@dataclass
class SearchJob:
    model: str  # the (robustly trained) model folder or shipped name
    out: str  # the new folder to write
    target_ms: float = 0.0  # the latency target of one UNet step (ms on the table's runtime) ...
    target_ratio: float = 0.0  # ... or as a fraction of the input UNet's measured step
    lut: str = ""  # a latency table (``pocketdiff bench --lut``); "" measures one now
    runtime: str = "torch"  # the runtime a table measured here is of: torch | onnxruntime
    kinds: str = "all"  # which blocks the search may remove: all | attention | resnet | name prefixes
    actions_per_round: int = 1
    max_rounds: int = 200
    val_n: int = 128  # validation latents of the proxy
    foreground_weight: float = 4.0  # object weight of the proxy's loss (as the Shapes recipes train)
    data: str = "shapes"  # the proxy's images (see pocketdiff.data.datasets)
    resolution: int = 0  # the table's image size in pixels (0: the model's own)
    batch: int = 1  # the table's images per call (the UNet runs 2x for CFG)
    runs: int = 5  # timed runs per block
    keep_attention: int = 0  # never remove the last N transformer blocks (text conditioning)
    train_steps: int = 0  # robust-training steps before each round (0: search the network as trained)
    skip_prob: float = 0.1  # those steps' skip probability of the blocks not yet removed
    train_lr: float = 2e-5

    def check(self) -> None:
        if (self.target_ms > 0) == (self.target_ratio > 0):
            raise PocketdiffError("give one latency target: --target-ms MS or --target-ratio R (e.g. 0.39)")
        if self.target_ratio >= 1:
            raise PocketdiffError(f"--target-ratio must be below 1 (a fraction of the UNet step), got {self.target_ratio}")
        out = Path(self.out)
        if out.exists():
            raise PocketdiffError(f"{out}: already exists; choose another --out")
        if not out.parent.exists():
            raise PocketdiffError(f"{out.parent}: folder does not exist; create it or choose another --out")
        if self.val_n < 8:
            raise PocketdiffError(f"--val-n must be >= 8, got {self.val_n}")
        if self.train_steps < 0 or (self.train_steps and not 0.0 < self.skip_prob < 1.0):
            raise PocketdiffError("--train-steps must be >= 0, and with it --skip-prob in (0, 1), e.g. 0.1")


def _table(job: SearchJob, unet, size: int, factor: int):
    from ..bench.lut import LatencyTable, arch_digest, measure_lut

    if job.lut:
        lut = LatencyTable.load(job.lut)
        if lut.arch != arch_digest(unet):
            raise PocketdiffError(f"{job.lut}: measured on another UNet (arch {lut.arch}, this one "
                                  f"{arch_digest(unet)}); measure it with `pocketdiff bench --model ... --lut FILE`")
        return lut
    print(f"measuring the latency table ({job.runtime}, {size} px)...", flush=True)
    return measure_lut(unet, runtime=job.runtime, resolution=size, batch=job.batch, latent_factor=factor,
                       runs=job.runs)


def measured_ms(unet, lut, removed: list[str], factor: int, runs: int = 10) -> float:
    """The whole UNet step with ``removed`` skipped, measured on torch at the table's settings."""
    from ..bench.measure import component_call, time_call
    from ..blocks.skipping import removed as skipped

    fn, inputs = component_call("unet", unet, resolution=lut.resolution, batch=lut.batch, cfg=lut.cfg,
                                latent_factor=factor)
    with skipped(unet, removed):
        return time_call(lambda: fn(*inputs), runs=runs, warmup=2)["median_ms"]


def _round_trainer(job: SearchJob, unet, parts: dict, data, tmp: Path):
    if not job.train_steps:
        return None
    from .robust import RobustRounds, round_trainer

    rounds = RobustRounds(job.train_steps, job.skip_prob, job.train_lr, foreground_weight=job.foreground_weight)
    return round_trainer(unet, parts, data, tmp / "robust", rounds)


def _finish_training(unet, tmp: Path):
    """Keep the robust training's loss log, drop its run folder; the UNet back on the CPU for timing and saving."""
    import shutil

    log = tmp / "robust" / "log.jsonl"
    if log.is_file():
        log.rename(tmp / "robust_log.jsonl")
    shutil.rmtree(tmp / "robust", ignore_errors=True)
    return unet.cpu().eval().requires_grad_(False)


def _summary(job: SearchJob, folder, target: float, lut, result, unet, factor: int, proxy_full: float) -> dict:
    return {"model": str(folder), "target_ms": target,
            "table": {k: getattr(lut, k) for k in ("runtime", "resolution", "batch", "cfg", "threads", "total_ms")},
            "removed": result.removed, "predicted_ms": result.predicted_ms,
            "measured_ms_torch": measured_ms(unet, lut, result.removed, factor) if lut.runtime == "torch" else None,
            "proxy_before": proxy_full, "proxy_after": result.proxy, "train_steps_per_round": job.train_steps,
            "rounds": len(result.rounds), "params": sum(p.numel() for p in unet.parameters())}


def _save(tmp: Path, folder, unet, parts: dict, summary: dict, target: float, lut, train_steps: int) -> None:
    """``tmp/model`` (the UNet with the searched blocks removed, the input's other parts) and ``search.json``."""
    from ..blocks.surgery import count_active_params, remove_blocks
    from ..files import write_text
    from ..folder import save_components

    searched = remove_blocks(unet, summary["removed"])
    summary["params_after"] = count_active_params(searched)
    trained = f"robustly trained {train_steps} steps before each round" if train_steps else "not retrained"
    card = {"description": f"{Path(folder).name} searched to {target:.2f} ms per UNet step ({lut.runtime}, "
                           f"{lut.resolution} px) by architecture evolution; {trained}", "search": dict(summary)}
    if (Path(folder) / "pocketdiff.json").is_file():
        card = {**json.loads((Path(folder) / "pocketdiff.json").read_text()), **card}
    save_components(tmp / "model", searched, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"], extra_files={"pocketdiff.json": json.dumps(card, indent=2)})
    write_text(tmp / "search.json", json.dumps(summary, indent=2))


def run_search(job: SearchJob) -> dict:
    """Run the search and write OUT; returns the summary."""
    from ..data.datasets import open_dataset
    from ..files import atomic_folder
    from ..folder import load_components
    from ..models.registry import resolve_model
    from ..schedule import NoiseSchedule
    from .evolve import SearchConfig, evolve
    from .proxy import proxy_loss, validation_set

    job.check()
    folder = resolve_model(job.model)
    parts = load_components(folder)
    unet = parts["unet"].float()
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    size = job.resolution or int(unet.config.sample_size) * factor
    data = open_dataset(job.data, size if job.data != "shapes" else 64)
    lut = _table(job, unet, size, factor)
    target = job.target_ms or job.target_ratio * lut.total_ms
    schedule = NoiseSchedule.from_config(parts["scheduler_config"])
    vset = validation_set(parts["vae"], parts["text_encoder"], parts["tokenizer"], schedule, n=job.val_n, data=data,
                          foreground_weight=job.foreground_weight)
    out = Path(job.out)
    with atomic_folder(out) as tmp:
        lut.save(tmp / "lut.json")
        train_round = _round_trainer(job, unet, parts, data, tmp)
        proxy_full = proxy_loss(unet, vset)  # the input network, every block kept, before any training
        with open(tmp / "search.jsonl", "w") as log:
            def write(record: dict) -> None:
                log.write(json.dumps(record) + "\n")
                log.flush()
                moves = ", ".join(f"{r['action']} {r['block']}" for r in record["executed"]) or "none"
                print(f"round {record['round']}: {moves} -> {record['predicted_ms']:.2f} ms predicted "
                      f"(target {target:.2f}), proxy {record['proxy_before']:.4f}", flush=True)

            result = evolve(unet, lut, vset, SearchConfig(target, job.kinds, job.actions_per_round, job.max_rounds,
                                                             keep_attention=job.keep_attention),
                            train_round=train_round, log=write)
        unet = _finish_training(unet, tmp) if train_round else unet
        summary = _summary(job, folder, target, lut, result, unet, factor, proxy_full)
        _save(tmp, folder, unet, parts, summary, target, lut, job.train_steps)
    return summary
