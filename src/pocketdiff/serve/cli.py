"""``pocketdiff serve``: its flags, the safety checks made before the model loads, and uvicorn."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ..errors import PocketdiffError

API_KEY_ENV = "POCKETDIFF_API_KEY"


def add_serve(sub, add_threads) -> None:
    p = sub.add_parser("serve", help="a local image server: OpenAI images API, a web page, metrics, micro-batching")
    p.add_argument("--model", default="default", help="model folder, ONNX export or shipped model name")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="auto (default): onnxruntime through a cached ONNX export of the model (made on first use), "
                        "torch where it is needed; torch; onnxruntime: a folder written by `pocketdiff export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (another than loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"Bearer token required on /v1/ routes (default: ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=8, help="images per UNet batch (1: no micro-batching)")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a batch waits for compatible requests")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests beyond which the server answers 429")
    p.add_argument("--timeout-s", type=float, default=120.0, help="a request not answered by then gets 504")
    p.add_argument("--max-n", type=int, default=4, help="most images per request")
    p.add_argument("--max-steps", type=int, default=100, help="most sampling steps per request")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable; "
                                                                       "default: no CORS)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_threads(p)
    p.set_defaults(func=cmd_serve)


def serve_config(args):
    """The checked :class:`~pocketdiff.serve.app.ServeConfig` of the flags (before any model loads)."""
    from .app import ServeConfig
    from .requests import ServeLimits

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not key:
        raise PocketdiffError(f"--host {args.host} is reachable from other machines: pass --api-key KEY (or set "
                              f"{API_KEY_ENV}), or bind 127.0.0.1")
    if not 0 < args.port < 65536:
        raise PocketdiffError(f"--port must be 1-65535, got {args.port}")
    if min(args.max_batch, args.max_queue, args.max_n, args.max_steps) < 1 or args.timeout_s <= 0 or \
            args.max_wait_ms < 0:
        raise PocketdiffError("--max-batch, --max-queue, --max-n, --max-steps and --timeout-s must be > 0, "
                              "--max-wait-ms >= 0")
    if args.max_n > args.max_batch:
        raise PocketdiffError(f"--max-n {args.max_n} is over --max-batch {args.max_batch}: a request must fit a batch")
    return ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                       timeout_s=args.timeout_s, api_key=key, cors_origins=tuple(args.cors_origin),
                       limits=ServeLimits(max_n=args.max_n, max_steps=args.max_steps))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise PocketdiffError(f"serve needs {e.name}: pip install 'pocketdiff[serve]'") from None
    from ..loader import load_generator
    from ..models.registry import resolve_model
    from .app import create_app
    from .engine import Engine

    cfg = serve_config(args)
    folder = resolve_model(args.model)
    pipe = load_generator(folder, args.model, backend=args.backend, threads=args.threads)
    name = Path(folder).name if args.model == "default" or Path(args.model).exists() else args.model
    app = create_app(Engine(pipe, name), cfg)
    print(f"serving {name} on http://{args.host}:{args.port}/ ({pipe.backend}: {pipe.backend_why}; {args.threads} thread(s); "
          f"batches of up to {cfg.max_batch}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
