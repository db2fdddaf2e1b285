"""A live pocketdiff server on a free loopback port, for the tests that talk to it with real clients."""

import pytest

from pocketdiff.testing import LiveServer


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
