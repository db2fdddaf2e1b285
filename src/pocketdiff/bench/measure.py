"""Cost of one call of a model component: parameters, multiply-accumulates, CPU latency, peak memory.

The numbers a CPU text-to-image model is judged by, measured the same way for every component:

* ``count_macs``: MACs of one call from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2),
  counting convolutions, matmuls and attention; it also runs on meta tensors, so a full-size model can be
  counted without memory or compute (build it under ``accelerate.init_empty_weights()``).
* ``time_call``: wall-clock median / min / max over repeated calls after a warm-up.
* ``peak_memory_mb``: the peak resident memory a call adds on top of what the process already holds.
* ``gemm_peak``: this machine's fp32 matrix-multiply rate (GFLOP/s) in this process, at its thread count: the
  ceiling a component's achieved rate (``with_peak``: 2 x MACs / median time) is set against.

``component_call`` builds the example inputs of one component kind ("unet", "vae", "text_encoder"),
``bench_component`` turns a module into one JSON-serialisable result row and ``bench_pipeline`` rows for
the three stages of a :class:`~pocketdiff.pipeline.Pipeline`.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

KINDS = ("text_encoder", "unet", "vae")
_MB = 1024 * 1024


# ---- parameters and MACs ------------------------------------------------------------------------
def count_params(module: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once); works on meta-device modules.

    Weights that weight-only quantization keeps as integer ``weight`` buffers (``pocketdiff.quant``) count too,
    so a quantized model has as many parameters as its float original."""
    tensors = {id(p): p for p in module.parameters()}
    for m in module.modules():
        w = m._buffers.get("weight")
        if w is not None and not w.is_floating_point():
            tensors[id(w)] = w
    return sum(t.numel() for t in tensors.values())


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode's registry has the CUDA attention kernels but not the fused CPU one that
# F.scaled_dot_product_attention dispatches to on CPU (torch 2.13), which would count as 0.
_EXTRA_FLOPS: dict[Any, Callable] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop


def count_macs(fn_or_module: Callable, *inputs: Any) -> int:
    """Multiply-accumulates of one call ``fn_or_module(*inputs)`` (FLOPs / 2), run under no_grad.

    Counted by ``FlopCounterMode``: conv, mm/addmm/bmm/baddbmm and scaled-dot-product attention (2 MACs-worth
    of FLOPs per multiply-add); element-wise ops, norms and softmax are not counted. Meta-device modules and
    inputs give the same count without computing anything.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        fn_or_module(*inputs)
    return int(counter.get_total_flops()) // 2


# ---- time -----------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], runs: int = 10, warmup: int = 2) -> dict:
    """Wall-clock time of ``fn()`` in ms (``time.perf_counter``), after ``warmup`` untimed calls.

    Runs under ``torch.inference_mode``. Returns ``{"median_ms", "min_ms", "max_ms", "runs"}``.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), runs=runs)


# ---- memory ---------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that isn't possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        # after a reset the mark sits at the current RSS; far above it means the write was ignored
        return _status_kb("VmHWM") - _status_kb("VmRSS") < 1024
    except (OSError, KeyError):
        return False


def _rss_bytes_reader() -> Callable[[], int]:
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def statm() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return statm


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak resident memory (MiB) that ``fn()`` adds above the process's RSS just before the call.

    Method, on Linux: write "5" to ``/proc/self/clear_refs``, which resets the kernel's high-water mark
    (``VmHWM``) to the current RSS, run ``fn`` under ``torch.inference_mode``, then read ``VmHWM`` from
    ``/proc/self/status``: exact, whatever the duration of the peak. Where ``clear_refs`` isn't writable
    (other OSes, some sandboxes), a background thread samples RSS (psutil, else ``/proc/self/statm``) every
    1 ms, which can miss a peak shorter than that. Process-wide: other threads' allocations count too.
    """
    gc.collect()
    if _reset_peak_rss():
        before = _status_kb("VmRSS")
        with torch.inference_mode():
            fn()
        return max(_status_kb("VmHWM") - before, 0) / 1024.0

    rss = _rss_bytes_reader()
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with torch.inference_mode():
            fn()
        peak[0] = max(peak[0], rss())
    finally:
        done.set()
        thread.join()
    return max(peak[0] - before, 0) / _MB


# ---- components -----------------------------------------------------------------------------
def _device_dtype(module) -> tuple[torch.device, torch.dtype]:
    """Where a module's floating weights live (CPU float32 for a runtime session, which has no parameters)."""
    for p in (module.parameters() if isinstance(module, torch.nn.Module) else ()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def component_call(kind: str, module: torch.nn.Module, *, resolution: int, batch: int = 1, cfg: bool = True,
                   seq_len: int | None = None, latent_factor: int = 8) -> tuple[Callable, tuple]:
    """``(fn, inputs)`` such that ``fn(*inputs)`` is one call of a component at an image ``resolution``.

    * "unet": one denoising step; with ``cfg`` the conditional and unconditional halves in one batch of 2B,
      text states of ``seq_len`` tokens (default 77), ``timestep_cond`` when the UNet has one (LCM-style).
    * "vae": the decoder only, latents (B, latent_channels, res/f, res/f).
    * "text_encoder": B random prompts of ``seq_len`` tokens (default min(77, max_position_embeddings)).

    Inputs live on the module's device and dtype, so a meta-device module gives meta inputs (for
    :func:`count_macs` without memory). The seed is fixed: inputs are the same from call to call.
    """
    device, dtype = _device_dtype(module)
    cfg_ = module.config
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=g).to(device, dtype)

    if kind == "text_encoder":
        limit = int(getattr(cfg_, "max_position_embeddings", 77))
        seq_len = min(77, limit) if seq_len is None else seq_len
        if seq_len > limit:
            raise ValueError(f"seq_len {seq_len} exceeds the text encoder's {limit} positions")
        if device.type == "meta":
            ids = torch.empty((batch, seq_len), dtype=torch.long, device=device)
        else:
            ids = torch.randint(0, int(cfg_.vocab_size), (batch, seq_len), generator=g).to(device)  # (B, L)
        return (lambda input_ids: module(input_ids)[0]), (ids,)

    if resolution % latent_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the latent factor {latent_factor}")
    h = resolution // latent_factor

    if kind == "unet":
        n = 2 * batch if cfg else batch
        sample = randn(n, int(cfg_.in_channels), h, h)  # (2B, C, h, w)
        t = torch.full((n,), 999, dtype=torch.long, device=device)  # (2B,)
        text = randn(n, 77 if seq_len is None else seq_len, int(cfg_.cross_attention_dim))  # (2B, L, D)
        w_dim = getattr(cfg_, "time_cond_proj_dim", None)
        if w_dim:
            tcond = randn(n, int(w_dim))  # (2B, E) guidance embedding
            return (lambda x, t_, s, c: module(x, t_, encoder_hidden_states=s, timestep_cond=c,
                                               return_dict=False)[0]), (sample, t, text, tcond)
        return (lambda x, t_, s: module(x, t_, encoder_hidden_states=s, return_dict=False)[0]), (sample, t, text)

    if kind == "vae":
        z = randn(batch, int(cfg_.latent_channels), h, h)  # (B, c, h, w)
        return (lambda z_: module.decode(z_, return_dict=False)[0]), (z,)

    raise ValueError(f"unknown component kind {kind!r}; choose one of {', '.join(KINDS)}")


def bench_component(name: str, kind: str, module: torch.nn.Module, *, resolution: int, batch: int = 1,
                    runs: int = 10, warmup: int = 2, latent_factor: int = 8, cfg: bool = True,
                    seq_len: int | None = None) -> dict:
    """One result row: params, MACs, latency and peak memory of one call of ``module`` (see ``component_call``).

    The MAC count is one extra call under ``FlopCounterMode`` and the peak one more, after the timed runs.
    """
    fn, inputs = component_call(kind, module, resolution=resolution, batch=batch, cfg=cfg, seq_len=seq_len,
                                latent_factor=latent_factor)
    macs = count_macs(fn, *inputs)
    timing = time_call(lambda: fn(*inputs), runs=runs, warmup=warmup)
    peak = peak_memory_mb(lambda: fn(*inputs))
    return dict(name=str(name), component=kind, resolution=int(resolution), batch=int(batch),
                params=count_params(module), macs=macs, gmacs=round(macs / 1e9, 4),
                median_ms=round(timing["median_ms"], 3), min_ms=round(timing["min_ms"], 3),
                max_ms=round(timing["max_ms"], 3), peak_mb=round(peak, 1), runs=int(runs),
                threads=torch.get_num_threads(), torch=torch.__version__)


def bench_pipeline(pipe, *, resolution: int | None = None, batch: int = 1, runs: int = 10, warmup: int = 2,
                   cfg: bool | None = None) -> list[dict]:
    """Rows for a pipeline's text encoder (one call of B prompts), UNet (one step) and VAE decoder.

    ``cfg`` defaults to what the pipeline does at its default guidance (the model card's, :meth:`Pipeline.settings`):
    a batch of 2B for a plain UNet at guidance != 1, B at guidance 1 or for a UNet with a guidance embedding
    (``time_cond_proj_dim``, LCM-style).
    """
    resolution = resolution or pipe.default_size
    if cfg is None:
        cfg = pipe.settings().guidance != 1.0 and not getattr(pipe.unet.config, "time_cond_proj_dim", None)
    seq_len = int(pipe.tokenizer.model_max_length)
    common = dict(resolution=resolution, batch=batch, runs=runs, warmup=warmup, latent_factor=pipe.vae_scale_factor,
                  seq_len=seq_len)
    return [
        bench_component(pipe.name, "text_encoder", pipe.text_encoder, **common),
        bench_component(pipe.name, "unet", pipe.unet, cfg=cfg, **common),
        bench_component(pipe.name, "vae", pipe.vae, **common),
    ]


# ---- against the machine's limit ---------------------------------------------------------------
def _ort_matmul(n: int, threads: int) -> Callable | None:
    """A call of an onnxruntime session holding one (n, n) x (n, n) MatMul, or None without onnxruntime."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    x = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("A", "B", "Y")]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "gemm", x[:2], x[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"A": np.random.rand(n, n).astype(np.float32), "B": np.random.rand(n, n).astype(np.float32)}
    return lambda: sess.run(None, feed)


def gemm_peak(sizes: tuple[int, ...] = (512, 1024, 2048), runs: int = 5) -> dict:
    """The best median fp32 GFLOP/s of a square matrix multiply over ``sizes`` (2 n^3 FLOPs each) by torch.mm and
    by onnxruntime's MatMul (when installed), at the current thread count: what a dense, cache-friendly kernel
    reaches here, the ceiling of any component's rate."""
    best = {"gflops": 0.0, "size": 0, "by": ""}
    threads = torch.get_num_threads()
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for by, fn in (("torch.mm", lambda: torch.mm(a, b)), ("onnxruntime MatMul", _ort_matmul(n, threads))):
            if fn is None:
                continue
            ms = time_call(fn, runs=runs, warmup=2)["median_ms"]
            gflops = 2 * n**3 / (ms / 1000) / 1e9
            if gflops > best["gflops"]:
                best = {"gflops": round(gflops, 2), "size": n, "by": by}
    return {**best, "threads": threads}


def with_peak(rows: list[dict], peak: dict) -> list[dict]:
    """Each row with its achieved GFLOP/s (2 x MACs per median call) and its share of ``peak``."""
    out = []
    for r in rows:
        gflops = 2 * r["macs"] / (r["median_ms"] / 1000) / 1e9 if r["median_ms"] > 0 else 0.0
        out.append({**r, "gflops": round(gflops, 2), "peak_gflops": peak["gflops"],
                    "peak_pct": round(100 * gflops / peak["gflops"], 1) if peak["gflops"] else None})
    return out


# ---- reports --------------------------------------------------------------------------------
_COLUMNS = (  # header, row -> text, right-aligned
    ("name", lambda r: str(r["name"]), False),
    ("component", lambda r: str(r["component"]), False),
    ("res", lambda r: str(r["resolution"]), True),
    ("batch", lambda r: str(r["batch"]), True),
    ("params M", lambda r: f"{r['params'] / 1e6:.2f}", True),
    ("GMACs", lambda r: f"{r['macs'] / 1e9:.3f}", True),
    ("median ms", lambda r: f"{r['median_ms']:.1f}", True),
    ("min ms", lambda r: f"{r['min_ms']:.1f}", True),
    ("max ms", lambda r: f"{r['max_ms']:.1f}", True),
    ("peak MB", lambda r: f"{r['peak_mb']:.1f}", True),
    ("GFLOP/s", lambda r: f"{r['gflops']:.1f}" if "gflops" in r else "-", True),
    ("% GEMM peak", lambda r: f"{r['peak_pct']:.0f}" if r.get("peak_pct") is not None else "-", True),
)


def _cells(rows: list[dict]) -> list[list[str]]:
    return [[cell(r) for _, cell, _ in _COLUMNS] for r in rows]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of result rows, one line per row."""
    body = _cells(rows)
    heads = [h for h, _, _ in _COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w)
                         for c, w, (_, _, right) in zip(cells, widths, _COLUMNS)).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in body])


def rows_to_markdown(rows: list[dict]) -> str:
    """Markdown table of result rows (for docs/RESULTS.md)."""
    heads = [h for h, _, _ in _COLUMNS]
    align = ["---:" if right else ":---" for _, _, right in _COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c) + " |" for c in _cells(rows)]
    return "\n".join(lines)
