"""Helpers for pocketdiff's tests (and for users testing their own recipes against the CLI)."""

from __future__ import annotations

from pathlib import Path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``pocketdiff ARGV`` in-process; (exit code, stdout, stderr). argparse's own exits count too."""
    from .cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tree(folder: Path) -> list[str]:
    """Every path below ``folder`` (hidden temp folders included), sorted: to assert nothing was left behind."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))
