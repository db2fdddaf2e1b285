"""``pocketdiff serve`` as a user starts it: refusals before the model loads, and a real process answering."""

import subprocess
import sys
import time

import httpx
import pytest

from pocketdiff.testing import free_port, run_cli


@pytest.mark.parametrize("argv, match", [
    (["--host", "0.0.0.0"], "--api-key KEY"),
    (["--host", "192.168.1.5"], "reachable from other machines"),
    (["--port", "0"], "--port must be"),
    (["--max-n", "9", "--max-batch", "8"], "must fit a batch"),
    (["--max-queue", "0"], "must be > 0"),
])
def test_unsafe_or_bad_settings_are_refused_in_one_line_before_the_model_loads(argv, match, capsys, monkeypatch):
    import pocketdiff.loader as loader

    monkeypatch.delenv("POCKETDIFF_API_KEY", raising=False)
    monkeypatch.setattr(loader, "load_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(["serve", *argv], capsys)
    assert code == 2 and match in err and err.strip().count("\n") == 0


def test_another_address_is_allowed_with_a_key_from_the_environment(monkeypatch):
    import argparse

    from pocketdiff.serve.cli import serve_config

    monkeypatch.setenv("POCKETDIFF_API_KEY", "k")
    args = argparse.Namespace(api_key=None, host="0.0.0.0", port=8000, max_batch=8, max_queue=4, max_n=4,
                              max_steps=50, timeout_s=10.0, max_wait_ms=5.0, cors_origin=[])
    assert serve_config(args).api_key == "k"


def test_the_command_serves_a_model_folder_until_stopped(tiny_folder):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pocketdiff", "serve", "--model", str(tiny_folder), "--port",
                             str(port), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert health["status"] == "ok" and health["model"] == tiny_folder.name
        r = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json={"prompt": "a red circle", "steps": 1},
                       timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
