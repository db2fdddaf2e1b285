"""The FastAPI app: the OpenAI images routes, models, health, metrics, progress, URL images and the web page.

Generation never runs on the event loop: requests become :class:`~pocketdiff.serve.batcher.Job` objects that one
worker thread batches and runs; a route awaits its job with the request's deadline and its client's connection
in view (504 past ``timeout_s``, the job dropped when the client goes away)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Request

from .batcher import Batcher, Job, QueueFull
from .engine import Cancelled, Engine
from .metrics import ServeMetrics
from .requests import ApiError, GenerationRequest, ServeLimits, parse_generation_request
from .store import ImageStore


@dataclass
class ServeConfig:
    max_batch: int = 8  # images per UNet batch
    max_wait_ms: float = 20.0  # how long the worker waits for compatible requests to join a batch
    max_queue: int = 32  # waiting requests; beyond: 429
    timeout_s: float = 120.0  # a request not answered by then is cancelled: 504
    api_key: str | None = None  # Bearer token required on /v1/ routes when set
    cors_origins: tuple[str, ...] = ()  # CORS off unless origins are given
    store_bytes: int = 64 * 1024 * 1024  # in-memory bound of the images answered by URL
    limits: ServeLimits = field(default_factory=ServeLimits)


def _page(name: str) -> bytes:
    return resources.files("pocketdiff").joinpath("assets", "serve", name).read_bytes()


def create_app(engine: Engine, cfg: ServeConfig | None = None):
    """The app serving ``engine``; its batcher thread starts now and stops on the app's shutdown."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    cfg = cfg or ServeConfig()
    metrics = ServeMetrics(cfg.max_batch)
    store = ImageStore(cfg.store_bytes)
    batcher = Batcher(engine.run, max_queue=cfg.max_queue, max_batch=cfg.max_batch,
                      max_wait_s=cfg.max_wait_ms / 1000, on_batch=metrics.observe_batch)
    jobs: dict[str, Job] = {}

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.stop()

    app = FastAPI(title="pocketdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.store = engine, batcher, metrics, store
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_guards(app, cfg)
    _add_generation(app, engine, cfg, batcher, metrics, store, jobs)
    _add_info(app, engine, cfg, batcher, metrics, store, jobs)
    return app


def _error(err: ApiError, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _add_guards(app, cfg: ServeConfig) -> None:
    """Bearer auth on /v1/ (when a key is set) and the body-size limit, before any route reads the body."""
    import hmac

    @app.middleware("http")
    async def guard(request, call_next):
        if request.url.path.startswith("/v1/") and cfg.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return _error(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                       type="authentication_error", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.limits.max_body_bytes:
            return _error(ApiError(413, f"request body over the limit of {cfg.limits.max_body_bytes} bytes"))
        return await call_next(request)


def _job(engine: Engine, req: GenerationRequest) -> Job:
    key = engine.batch_key(req.steps, req.sampler, req.guidance, req.width, req.height)
    return Job(prompts=[req.prompt] * req.n, seeds=[req.seed + i for i in range(req.n)],
               negative_prompt=req.negative_prompt, key=key, id=uuid.uuid4().hex)


async def _wait(request, job: Job, timeout_s: float):
    """The job's images; 504 past the deadline, None when the client went away (the job is dropped either way)."""
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout_s
    while True:
        done, _ = await asyncio.wait({future}, timeout=min(0.25, max(deadline - time.monotonic(), 0)))
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel()
            return None
        if time.monotonic() >= deadline:
            job.cancel()
            raise ApiError(504, f"not answered within {timeout_s:g} s; the request was cancelled", type="timeout")


def _add_generation(app, engine, cfg, batcher, metrics, store, jobs) -> None:
    from fastapi.responses import Response

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        t0 = time.perf_counter()
        headers = None
        try:
            req = parse_generation_request(await request.body(), model=engine.name, sizes=engine.sizes,
                                           samplers=_samplers(), limits=cfg.limits)
            job = _job(engine, req)
            request_id = request.headers.get("x-request-id", "")[:64]
            jobs[request_id or job.id] = job
            _forget_old(jobs)
            try:
                batcher.submit(job)
            except QueueFull as e:
                headers = {"Retry-After": "1"}
                raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error") from None
            finally:
                metrics.queue_depth.set(batcher.depth())
            pngs = await _wait(request, job, cfg.timeout_s)
            if pngs is None:
                metrics.requests.labels("499").inc()
                return Response(status_code=499)
            data = [{"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{store.put(p)}.png"}
                    if req.response_format == "url" else {"b64_json": base64.b64encode(p).decode()} for p in pngs]
            metrics.requests.labels("200").inc()
            return {"created": int(time.time()), "data": data}
        except ApiError as err:
            metrics.requests.labels(str(err.status)).inc()
            return _error(err, headers)
        except (Cancelled, RuntimeError, ValueError) as e:  # a failed batch: this request fails, the server lives
            metrics.requests.labels("500").inc()
            return _error(ApiError(500, f"generation failed: {e}", type="server_error"))
        finally:
            metrics.latency.observe(time.perf_counter() - t0)

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        data = store.get(name.removesuffix(".png"))
        if data is None:
            return _error(ApiError(404, "no such image (images answered by URL are kept in memory for a while)"))
        return Response(data, media_type="image/png")


def _samplers() -> list[str]:
    from ..sampling import SAMPLERS

    return sorted(SAMPLERS)


def _forget_old(jobs: dict, keep: int = 256) -> None:
    """Progress entries of finished jobs beyond the newest ``keep``."""
    while len(jobs) > keep:
        jobs.pop(next(iter(jobs)))


def _add_info(app, engine, cfg, batcher, metrics, store, jobs) -> None:
    from fastapi.responses import HTMLResponse, Response

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "pocketdiff"}]}

    @app.get("/v1/progress/{request_id}")
    async def progress(request_id: str):
        job = jobs.get(request_id)
        if job is None:
            return _error(ApiError(404, "no such request"))
        return {"state": job.state, "step": job.step, "steps": job.key[1], "queue_depth": batcher.depth()}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "queue_depth": batcher.depth()}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(batcher.depth())
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/settings")
    async def settings():
        chosen = engine.pipe.settings()
        return {"model": engine.name, "sizes": engine.sizes, "samplers": _samplers(), "steps": chosen.steps,
                "sampler": chosen.sampler, "guidance": chosen.guidance, "max_n": cfg.limits.max_n,
                "max_steps": cfg.limits.max_steps, "auth": bool(cfg.api_key)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page("index.html"))

    @app.get("/static/{name}")
    async def static(name: str):
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in kinds:
            return _error(ApiError(404, "no such file"))
        return Response(_page(name), media_type=kinds[name])
