"""The server with real clients: the official openai client, httpx for the HTTP edge cases (auth, 429, 504,
disconnects, the bad-input table), a live uvicorn on a free loopback port and the tiny random model."""

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from pocketdiff.serve.engine import Engine

from test_requests import BAD_REQUESTS


class GatedEngine(Engine):
    """The tiny model, each batch held until ``gate`` is set; ``ran`` records the prompts of every batch run."""

    def __init__(self, pipe):
        super().__init__(pipe, "tiny")
        self.gate, self.ran, self.entered = threading.Event(), [], threading.Event()

    def run(self, jobs):
        self.entered.set()
        self.gate.wait(20)
        self.ran.append([p for j in jobs for p in j.prompts])
        return super().run(jobs)


def post(url, body, **kw):
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=kw.pop("timeout", 30), **kw)


def in_thread(fn, *args, **kw):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _try(fn, *args, **kw)), daemon=True)
    t.start()
    return t, out


def _try(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except httpx.HTTPError as e:
        return e


def test_the_openai_client_gets_decodable_images_as_b64_json_and_url(serve):
    from openai import OpenAI

    live = serve()
    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    r = client.images.generate(model="tiny", prompt="a red circle", n=2, size="16x16", response_format="b64_json",
                               extra_body={"steps": 2, "seed": 5})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert [im.size for im in images] == [(16, 16)] * 2 and r.created > 0
    assert [im.text["seed"] for im in images] == ["5", "6"] and images[0].text["steps"] == "2"
    assert images[0].text["model"] == "tiny" and images[0].text["generator"].startswith("pocketdiff")
    assert r.data[0].revised_prompt is None
    r = client.images.generate(model="tiny", prompt="a red circle", response_format="url", extra_body={"steps": 2})
    png = httpx.get(r.data[0].url).content
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_the_same_seed_gives_the_same_image_alone_or_in_a_batch(serve):
    live = serve(max_wait_ms=300)
    alone = post(live.url, {"prompt": "a red circle", "seed": 11, "steps": 2}).json()["data"][0]["b64_json"]
    threads = [in_thread(post, live.url, {"prompt": p, "seed": s, "steps": 2})
               for p, s in [("a red circle", 11), ("a blue square", 3), ("a green star", 4)]]
    for t, _ in threads:
        t.join(30)
    batched = threads[0][1]["r"].json()["data"][0]["b64_json"]
    a, b = (Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB") for x in (alone, batched))
    assert max(abs(p - q) for pa, pb in zip(a.getdata(), b.getdata()) for p, q in zip(pa, pb)) <= 2
    text = httpx.get(f"{live.url}/metrics").text
    assert "pocketdiff_batch_images_sum 4.0" in text  # one image alone, then three in one batch


@pytest.fixture(scope="module")
def shared(tiny_pipe):
    """One server for the bad-input table."""
    from pocketdiff.serve.app import create_app
    from pocketdiff.testing import LiveServer

    with LiveServer(create_app(Engine(tiny_pipe, "tiny"))) as live:
        yield live


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_lives_on(shared, name):
    live = shared
    body, status, param = BAD_REQUESTS[name]
    r = httpx.post(f"{live.url}/v1/images/generations", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_an_api_key_guards_every_v1_route(serve):
    live = serve(api_key="s3cret")
    for path in ("/v1/models", "/v1/settings"):
        r = httpx.get(live.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(live.url, {"prompt": "a"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = post(live.url, {"prompt": "a", "steps": 1}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and httpx.get(f"{live.url}/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after_and_health_answers_while_the_model_works(serve, tiny_pipe):
    engine = GatedEngine(tiny_pipe)
    live = serve(engine, max_queue=1, max_batch=1, max_wait_ms=0)
    running = in_thread(post, live.url, {"prompt": "first", "steps": 1})
    assert engine.entered.wait(10)
    waiting = in_thread(post, live.url, {"prompt": "second", "steps": 1})
    time.sleep(0.3)
    t0 = time.perf_counter()
    assert httpx.get(f"{live.url}/health", timeout=5).json()["queue_depth"] == 1
    assert time.perf_counter() - t0 < 2  # the event loop is free while a batch runs
    full = post(live.url, {"prompt": "third", "steps": 1})
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"
    engine.gate.set()
    for t, out in (running, waiting):
        t.join(30)
        assert out["r"].status_code == 200
    assert 'pocketdiff_requests_total{status="429"} 1.0' in httpx.get(f"{live.url}/metrics").text


def test_a_request_past_its_timeout_is_cancelled_with_504_and_a_gone_client_is_dropped(serve, tiny_pipe):
    engine = GatedEngine(tiny_pipe)
    live = serve(engine, max_batch=1, max_wait_ms=0, timeout_s=1.0)
    late = post(live.url, {"prompt": "first", "steps": 1})
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
    gone = _try(post, live.url, {"prompt": "gone", "steps": 1}, timeout=0.4)  # the client hangs up
    assert isinstance(gone, httpx.TimeoutException)
    time.sleep(0.6)  # the server notices within 0.25 s
    engine.gate.set()
    ok = post(live.url, {"prompt": "after", "steps": 1})
    assert ok.status_code == 200
    assert engine.ran == [["first"], ["after"]]  # "first" was already running; "gone" never ran
