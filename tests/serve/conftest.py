"""A live pocketdiff server on a free loopback port, for the tests that talk to it with real clients."""

import socket
import threading
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` in a thread; ``url`` is its base URL."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder):
    from pocketdiff.pipeline import Pipeline

    return Pipeline.from_folder(tiny_folder)


@pytest.fixture
def serve(tiny_pipe):
    """``serve(engine=None, **ServeConfig fields)`` -> a started LiveServer (stopped at the test's end)."""
    from pocketdiff.serve.app import ServeConfig, create_app
    from pocketdiff.serve.engine import Engine

    started = []

    def start(engine=None, **cfg):
        live = LiveServer(create_app(engine or Engine(tiny_pipe, "tiny"), ServeConfig(**cfg))).__enter__()
        started.append(live)
        return live

    yield start
    for live in started:
        live.__exit__(None, None, None)
