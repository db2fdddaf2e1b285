"""Model folders shipped inside the package, and how a ``--model`` argument resolves to a folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PocketdiffError

MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
# First shipped name found is the default (a trained model takes over from the labelled tiny one).
DEFAULT_PREFERENCE = ("shapes-teacher", "tiny-random")


def shipped_models() -> dict[str, Path]:
    """name -> folder of every model folder inside the package."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "model_index.json").is_file()}


def default_model_name() -> str:
    models = shipped_models()
    for name in DEFAULT_PREFERENCE:
        if name in models:
            return name
    raise PocketdiffError("no model ships with this install; pass --model a local diffusers folder")


def model_card(path: Path) -> dict:
    """The folder's pocketdiff.json (defaults, measured quality), or {} when it has none."""
    card = path / "pocketdiff.json"
    if not card.is_file():
        return {}
    try:
        data = json.loads(card.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PocketdiffError(f"{card}: not valid JSON; fix or delete the model card") from None
    if not isinstance(data, dict):
        raise PocketdiffError(f"{card}: must hold a JSON object; fix or delete the model card")
    return data


def resolve_model(name_or_path: str | Path) -> Path:
    """A local folder path, a shipped model's name, or "default"."""
    if str(name_or_path) == "default":
        name_or_path = default_model_name()
    p = Path(name_or_path)
    if p.exists():
        return p
    models = shipped_models()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    names = ", ".join(models) or "none"
    raise PocketdiffError(f"{name_or_path}: no such model folder or shipped model (shipped: {names}); "
                          "pass a local diffusers folder")
