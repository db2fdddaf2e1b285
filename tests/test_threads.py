"""The thread count: given, else $POCKETDIFF_THREADS, else the cores free now."""

import os

import pytest

from pocketdiff.errors import PocketdiffError
from pocketdiff.threads import ENV, choose_threads, free_cores, usable_cores


def test_given_beats_the_environment_which_beats_free_cores(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert choose_threads(2) == (2, "given")
    assert choose_threads() == (3, ENV)
    monkeypatch.delenv(ENV)
    n, why = choose_threads()
    assert why == "free cores" and n == free_cores()


def test_free_cores_subtracts_the_busy_cores_and_keeps_one(monkeypatch):
    import pocketdiff.threads as threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_busy_cores", lambda: 1.2)
    assert usable_cores() == 4 and free_cores() == 3
    monkeypatch.setattr(threads, "_busy_cores", lambda: 9.0)
    assert free_cores() == 1
    monkeypatch.setattr(threads, "_busy_cores", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (2.4, 0.0, 0.0))
    assert free_cores() == 2


def test_busy_cores_sees_this_machine():
    from pocketdiff.threads import _busy_cores

    busy = _busy_cores()
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_environment_value_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(PocketdiffError, match=ENV):
        choose_threads()


def test_cli_refuses_zero_threads_in_one_line(capsys):
    from pocketdiff.testing import run_cli

    code, _, err = run_cli(["generate", "x", "--threads", 0], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--threads must be >= 1" in err
