"""Offline for real: export to ONNX and generate through onnxruntime open no network connection (issue 22).

Each command runs under ``strace -f -e trace=connect,sendto`` and the test fails on any AF_INET/AF_INET6
connection or DNS packet; local sockets (AF_UNIX: nscd's user lookups) are allowed. Before onnxruntime's
telemetry was switched off, every export made DNS lookups for its telemetry host.
"""

import re
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow,  # two traced subprocesses, ~45 s: CI's separate slow step
              pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")]

NETWORK = re.compile(r"sa_family=AF_INET6?\b|htons\(53\)|sendto\(\d+, \"[^\"]*\\\\[0-7]{1,3}(events|data)")


def _network_calls(cmd: list[str], tmp_path) -> list[str]:
    trace = tmp_path / f"trace-{len(list(tmp_path.iterdir()))}.txt"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace),
                           sys.executable, "-m", "pocketdiff", *cmd], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = trace.read_text().splitlines()
    return [line for line in lines if NETWORK.search(line) and "127.0.0.1" not in line and "::1" not in line]


def test_onnx_export_and_the_onnxruntime_backend_make_no_network_call(tmp_path):
    export = tmp_path / "model.onnx"
    assert _network_calls(["export", "tiny-random", "--format", "onnx", "-o", str(export)], tmp_path) == []
    assert _network_calls(["generate", "a small red star at the top left on a blue background", "--model",
                           str(export), "--backend", "onnxruntime", "--steps", "2", "--no-progress", "-o",
                           str(tmp_path / "x.png")], tmp_path) == []
