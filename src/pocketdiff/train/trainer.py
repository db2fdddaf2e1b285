"""The one training loop every recipe runs (consistency_models' style: a recipe is a loss function).

A recipe gives ``loss_fn(model, batch, step) -> (loss, terms)`` and a ``batches(step)`` function; the
loop owns the rest: accelerate (devices, mixed precision, multi-process), AdamW with warm-up and cosine
decay, gradient clipping, EMA, a progress bar, a JSONL loss log, periodic checks of sample quality, and
atomic checkpoints that resume after a kill (data is a function of the step, so resuming reproduces it).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

LossFn = Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"  # run folder: checkpoint, log.jsonl, best/ and the exported model
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 32  # per process
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1  # the cosine decay ends at this fraction of lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm (0: off)
    ema_decay: float = 0.999  # 0: no EMA
    ema_warmup: bool = True  # decay ramps as (1 + step) / (10 + step) early on
    checkpoint_every: int = 500  # steps
    log_every: int = 25  # steps
    monitor_every_s: float = 600.0  # seconds between quality checks (monitor callback); 0: off
    mixed_precision: str = "no"  # accelerate: "no" | "fp16" | "bf16" (bf16 is ~100x slower on these CPUs)
    gradient_checkpointing: bool = False  # for SD-scale models on GPUs
    # micro-batches per optimizer step (each of batch_size, per process): an effective batch larger than memory
    gradient_accumulation_steps: int = 1
    seed: int = 0  # seeds the model initialisation and every batch (a batch is a function of seed and step)
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall time; 0: no limit
    # a monitor metric, higher is better (e.g. "all_correct"): every check that beats the best so far keeps
    # its EMA weights in out_dir/best, and the recipe exports those instead of the last ones ("": off)
    keep_best: str = ""
    # SnapFusion's robust training: each ResNet / transformer block of the trained UNet skipped with this
    # probability per optimizer step (0: off), so the result can be evaluated with blocks removed
    skip_prob: float = 0.0
    skip_blocks: str = "all"  # which blocks may be skipped: all | attention | resnet | comma-separated name prefixes

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("steps, batch_size and gradient_accumulation_steps must be >= 1")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("log_every and checkpoint_every must be >= 1")
        if not self.lr > 0 or self.warmup_steps < 0 or self.max_minutes < 0:
            raise ValueError("lr must be > 0, warmup_steps and max_minutes >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.keep_best and self.monitor_every_s <= 0:
            raise ValueError("keep_best needs the monitor: set monitor_every_s > 0")
        if not 0.0 <= self.skip_prob < 1.0:
            raise ValueError(f"skip_prob must be in [0, 1), got {self.skip_prob}")


class EMA:
    """Exponential moving average of a module's floating-point parameters (kept in float32)."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    def copy_to(self, module: torch.nn.Module) -> None:
        state = module.state_dict()
        module.load_state_dict({k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()})


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


class _LossModule(torch.nn.Module):
    """model + recipe loss as one module whose forward is the loss.

    accelerate wraps *this* in DistributedDataParallel, so every recipe, whatever submodules its loss
    calls (UNet, text encoder, adapters), runs its forward through DDP and synchronises gradients.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, step: int):
        return self.loss_fn(self.model, batch, step)


def param_groups(model: torch.nn.Module, params, lr: float) -> list[dict]:
    """AdamW parameter groups: ``params`` (parameters, or groups with an optional ``lr_scale``; default all of
    ``model``'s), keeping only parameters that require grad."""
    items = list(params) if params is not None else list(model.parameters())
    if not items or not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for g in items:
        kept = [p for p in g["params"] if p.requires_grad]
        if kept:
            groups.append({"params": kept, "lr": lr * g.get("lr_scale", 1.0)})
    return groups


def steps_card(run_steps: int, init_from: str = "") -> dict:
    """Model-card fields for how much training the saved weights have had.

    A run that continues a trained folder (``init_from``) counts that folder's ``steps_trained`` too, so the
    card of a continued model states its total; ``steps_this_run`` keeps this run's share.
    """
    if not init_from:
        return {"steps_trained": run_steps}
    from ..models.registry import model_card

    before = int(model_card(Path(init_from)).get("steps_trained", 0))
    return {"steps_trained": before + run_steps, "steps_this_run": run_steps, "init_from": init_from}


def export_card(chosen: dict, init_from: str = "") -> dict:
    """Model-card fields for the weights :meth:`Trainer.final_model` chose: their steps (see :func:`steps_card`)
    and, when the best monitored check was kept, which check it was (``selected``)."""
    card = steps_card(chosen["step"], init_from)
    if "metric" in chosen:
        card["selected"] = {k: chosen[k] for k in ("metric", "value", "step", "of_steps")}
    return card


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished folder ``tmp`` (renames only, so a kill leaves one of them whole)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``loss_fn`` over ``batches`` on ``model`` (a Module or ModuleDict)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, loss_fn: LossFn, batches: Callable[[int], dict],
                 monitor: Callable[[int, torch.nn.Module], dict] | None = None,
                 params: Iterable[torch.nn.Parameter] | Iterable[dict] | None = None,
                 after_step: Callable[[int, torch.nn.Module], None] | None = None):
        """``after_step(step, model)`` runs after every optimizer step and EMA update, on the unwrapped model
        (e.g. LCD's EMA *target* network; keep such state inside ``model`` so checkpoints carry it).

        ``params``: the trained parameters (default: all of ``model``'s that require grad), or parameter groups
        ``{"params": [...], "lr_scale": s}`` whose learning rate is ``s * cfg.lr`` on the same schedule
        (e.g. a discriminator that must learn faster than the generator)."""
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        # step_scheduler_with_optimizer=False: our LambdaLR counts optimizer steps, not samples, so it must
        # not be stepped once per process (accelerate's default would run it N times too fast under DDP).
        from accelerate.utils import DistributedDataParallelKwargs

        from ..blocks.skipping import StochasticSkipper

        # a skipped block's parameters get no gradient that step: DDP must not wait for them
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.skip_prob > 0 else []
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                                       step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
        self.raw_model = model
        self.skipper = StochasticSkipper(model, cfg.skip_prob, cfg.skip_blocks, cfg.seed)
        if cfg.gradient_checkpointing:
            for m in model.modules():
                if hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(param_groups(model, params, cfg.lr), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(_LossModule(model, loss_fn),
                                                                              self.optimizer, self.scheduler)
        self.ema = EMA(self.raw_model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.batches, self.monitor, self.after_step = batches, monitor, after_step
        self.step = 0
        self._elapsed_before, self._run_start = 0.0, 0.0  # wall time of earlier runs; this run's start
        self._last_log = 0.0  # when the last log line was written (its samples_per_s covers the time since)
        self._checked_step = -1  # the step of the last monitor check
        self._stop = False

    # ---- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> None:
        """Write model, EMA, optimizer and step to a temp folder, then swap it in (atomic on POSIX)."""
        if not self.accelerator.is_main_process:
            return
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_contiguous(self.raw_model.state_dict()), str(tmp / "model.safetensors"))
        if self.ema is not None:
            save_file(_contiguous(self.ema.shadow), str(tmp / "ema.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "elapsed_s": round(self.elapsed(), 1),
                                                    "config": asdict(self.cfg)}, indent=2))
        _swap_in(tmp, self.ckpt_dir)

    def load_checkpoint(self) -> bool:
        """Restore the newest complete checkpoint: ``checkpoint``, else the ``.old`` or ``.tmp`` that a kill
        in the middle of :meth:`save_checkpoint` can leave (``state.json`` is written last, so it marks
        a complete one)."""
        candidates = [self.ckpt_dir, self.out / "checkpoint.old", self.out / "checkpoint.tmp"]
        d = next((c for c in candidates if (c / "state.json").is_file()), None)
        if d is None:
            return False
        try:
            self.raw_model.load_state_dict(load_file(str(d / "model.safetensors")))
        except RuntimeError:
            raise ValueError(f"{d} holds a checkpoint of another model; pass --no-resume or another --out-dir") from None
        device = self.accelerator.device
        if self.ema is not None and (d / "ema.safetensors").is_file():
            self.ema.shadow = {k: v.to(device) for k, v in load_file(str(d / "ema.safetensors")).items()}
        opt = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if "rng" in opt:
            torch.set_rng_state(opt["rng"])
        state = json.loads((d / "state.json").read_text())
        self.step, self._elapsed_before = state["step"], float(state.get("elapsed_s", 0.0))
        self._drop_replayed_log()
        return True

    def _drop_replayed_log(self) -> None:
        """Forget log lines after the resumed step: the run replays those steps and logs them again."""
        log = self.out / "log.jsonl"
        if not self.accelerator.is_main_process or not log.is_file():
            return
        lines = log.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
        if len(kept) != len(lines):
            from ..files import write_text

            write_text(log, "".join(line + "\n" for line in kept))

    def elapsed(self) -> float:
        """Training wall time in seconds over every run of this folder (carried in the checkpoint)."""
        return self._elapsed_before + (time.time() - self._run_start if self._run_start else 0.0)

    # ---- the best-monitored weights (cfg.keep_best) ------------------------------------------------
    @property
    def best_dir(self) -> Path:
        return self.out / "best"

    def _best_folder(self) -> Path | None:
        """``best``, else the ``best.old`` that a kill between the renames of :func:`_swap_in` leaves."""
        return next((d for d in (self.best_dir, self.out / "best.old") if (d / "best.json").is_file()), None)

    def best_record(self) -> dict | None:
        """``{"metric", "value", "step"}`` of the best check kept so far, or None."""
        d = self._best_folder()
        return json.loads((d / "best.json").read_text()) if d is not None else None

    def _keep_if_best(self, metrics: dict) -> None:
        name = self.cfg.keep_best
        if name not in metrics:
            raise ValueError(f"keep_best={name!r} is not a monitor metric; the monitor reports {sorted(metrics)}")
        value = float(metrics[name])
        best = self.best_record()
        if best is not None and value <= best["value"]:
            return
        tmp = self.out / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = self.ema.shadow if self.ema is not None else self.raw_model.state_dict()
        save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
        (tmp / "best.json").write_text(json.dumps({"metric": name, "value": value, "step": self.step}))
        _swap_in(tmp, self.best_dir)
        tqdm.write(f"[step {self.step}] best {name} so far ({value:.4g}): kept in {self.best_dir}")

    def final_model(self) -> tuple[torch.nn.Module, dict]:
        """The model a recipe exports, and which weights they are.

        With ``cfg.keep_best`` and a kept check: the EMA weights of the best check, and ``{"step", "metric",
        "value", "of_steps"}``; otherwise the last EMA weights and ``{"step"}``.
        """
        model = self.ema_model()
        folder = self._best_folder() if self.cfg.keep_best else None
        if folder is None:
            return model, {"step": self.step}
        best = json.loads((folder / "best.json").read_text())
        kept = load_file(str(folder / "weights.safetensors"))
        state = model.state_dict()
        model.load_state_dict({k: (kept[k].to(v.dtype) if k in kept else v) for k, v in state.items()})
        return model, {**best, "of_steps": self.step}

    def ema_model(self) -> torch.nn.Module:
        """A copy of the model holding the EMA weights (the model itself when EMA is off)."""
        import copy

        model = copy.deepcopy(self.raw_model)
        if self.ema is not None:
            self.ema.copy_to(model)
        return model.eval()

    # ---- loop --------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _request_stop(self, *_args) -> None:
        self._stop = True

    def _should_stop(self, start: float) -> bool:
        """A stop (signal, or max_minutes on any process) agreed by all processes, so none waits forever
        in the next all-reduce."""
        local = self._stop or bool(self.cfg.max_minutes and (time.time() - start) / 60 > self.cfg.max_minutes)
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _start(self, resume: bool) -> None:
        """Resume from the last checkpoint, or forget a best kept by an earlier run in this folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.load_checkpoint():
            print(f"resumed from {self.ckpt_dir} at step {self.step}", flush=True)
        elif self.accelerator.is_main_process:  # a fresh run: a best kept by an earlier run is not ours
            for d in (self.best_dir, self.out / "best.old"):
                shutil.rmtree(d, ignore_errors=True)

    def _train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches (then EMA and ``after_step``);
        returns the loss and the recipe's terms, averaged over the micro-batches.

        Accumulation is done here rather than by accelerate's ``accumulate``, whose step counter is process-global
        state shared by every Accelerator: gradients of all but the last micro-batch stay local (``no_sync``)."""
        import contextlib

        cfg, acc = self.cfg, self.accelerator
        n = cfg.gradient_accumulation_steps
        terms_sum: dict[str, float] = {}
        for k in range(n):
            # each process draws its own batches; a pure function of (step, micro-batch, rank) keeps resume exact
            index = (self.step * n + k) * acc.num_processes + acc.process_index
            batch = to_device(self.batches(index), acc.device)
            with contextlib.nullcontext() if k == n - 1 else acc.no_sync(self.model), self.skipper.step(self.step):
                loss, terms = self.model(batch, self.step)
                acc.backward(loss / n if n > 1 else loss)
            for name, v in {"loss": float(loss.detach()), **terms}.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + float(v) / n
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model, self.step)
        if self.after_step is not None:
            self.after_step(self.step, self.raw_model)
        self.step += 1
        return terms_sum

    def _after_step(self, sums: dict, n: int, last_monitor: float, bar) -> tuple[dict, int, float]:
        """Log every ``log_every`` steps, checkpoint every ``checkpoint_every``, check every ``monitor_every_s``;
        returns the (possibly reset) running sums, their count and the time of the last check."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            avg = {k: v / n for k, v in sums.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in avg.items()})
            now = time.time()
            samples = n * cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
            rate = samples / max(now - self._last_log, 1e-9)  # all processes together: a GPU run's throughput
            self._last_log = now
            self._log({"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                       "elapsed_s": round(self.elapsed(), 1), "samples_per_s": round(rate, 1), **avg})
            sums, n = {}, 0
        if self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.monitor is not None and cfg.monitor_every_s > 0 and time.time() - last_monitor > cfg.monitor_every_s:
            self._run_monitor()
            last_monitor = time.time()
        return sums, n, last_monitor

    def run(self, resume: bool = True) -> int:
        """Train to ``cfg.steps`` (from the last checkpoint if ``resume``); returns the step reached.

        ``max_minutes`` ends the run early and normally (the caller exports what it has). Ctrl-C or SIGTERM
        save a checkpoint and re-raise KeyboardInterrupt, so no unfinished model is exported.
        """
        self._start(resume)
        prev = signal.signal(signal.SIGTERM, self._request_stop)
        cfg = self.cfg
        start = last_monitor = self._run_start = self._last_log = time.time()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.out.name, unit="step",
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True, mininterval=2.0)
        sums: dict[str, float] = {}
        n = 0
        self.model.train()
        interrupted = False
        try:
            while self.step < cfg.steps:
                for k, v in self._train_step().items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
                bar.update(1)
                sums, n, last_monitor = self._after_step(sums, n, last_monitor, bar)
                if self._should_stop(start):
                    interrupted = self._stop
                    reason = "stop requested" if interrupted else f"max_minutes={cfg.max_minutes} reached"
                    print(f"\nstopping at step {self.step}: {reason}", flush=True)
                    break
        except KeyboardInterrupt:
            interrupted = True
            print(f"\ninterrupted at step {self.step}; saving a checkpoint", flush=True)
        finally:
            bar.close()
            self.save_checkpoint()
            signal.signal(signal.SIGTERM, prev)
        if interrupted:
            raise KeyboardInterrupt
        if self.monitor is not None and cfg.monitor_every_s > 0 and self._checked_step != self.step:
            self._run_monitor()  # a final check (also after max_minutes) unless the last one was at this step
        return self.step

    def _run_monitor(self) -> None:
        self._checked_step = self.step
        if not self.accelerator.is_main_process:
            return
        metrics = self.monitor(self.step, self.ema_model().cpu())  # sampling checks run on the CPU
        self.model.train()
        self._log({"step": self.step, "monitor": metrics})
        if self.cfg.keep_best:
            self._keep_if_best(metrics)
        tqdm.write(f"[step {self.step}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in metrics.items()))
