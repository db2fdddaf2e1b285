"""Typed config dataclasses as command-line flags: one ``--flag`` per scalar field, its help from the field's comment.

A config's documentation lives where nanoGPT's does, in comments beside the fields; :func:`field_help` reads
them back from the source (the comment block just above a field, then its trailing comment), so ``--help``
says what the code says.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from functools import cache

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


@cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> the text of its comments in ``cls``'s source ("" where there are none)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    block: list[str] = []
    for line in lines[1:]:
        comment = _COMMENT.match(line)
        if comment:
            block.append(comment.group(1).strip())
            continue
        field = _FIELD.match(line)
        if field and not line.lstrip().startswith(("def ", "@", "return")):
            parts = block + ([field.group(2).strip()] if field.group(2) else [])
            out.setdefault(field.group(1), " ".join(p for p in parts if p))
        block = []
    return out


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict | None = None) -> list[str]:
    """One ``--flag`` per int/float/str/bool field of dataclass ``cls`` (``defaults`` override the class's);
    returns the field names added."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    names = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp not in (int, float, str, bool):
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = helps.get(f.name, "")
        help_text = ((f"{text} " if text else "") + f"(default: {default!r})").replace("%", "%%")  # argparse formats
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text)
        names.append(f.name)
    return names
