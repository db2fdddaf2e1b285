"""Model folders shipped inside the package, and how a ``--model`` argument resolves to a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


# What sampling falls back to when neither the caller nor the model card says: diffusers' SD pipeline defaults
# (its 50 steps aside: DPM-Solver++ needs fewer).
FALLBACK_SAMPLING = {"steps": 25, "sampler": "dpmpp_2m", "guidance": 7.5}


@dataclass(frozen=True)
class SamplingSettings:
    """Steps, sampler and guidance of a generation, and where each came from ("given", "card" or "fallback")."""

    steps: int
    sampler: str
    guidance: float
    source: dict

    def line(self) -> str:
        return (f"sampling: {self.steps} steps ({self.source['steps']}), {self.sampler} ({self.source['sampler']}), "
                f"guidance {self.guidance:g} ({self.source['guidance']})")


def sampling_settings(card_defaults: dict | None, steps: int | None = None, sampler: str | None = None,
                      guidance: float | None = None) -> SamplingSettings:
    """The settings to sample with: each one given, else the model card's ``defaults``, else
    :data:`FALLBACK_SAMPLING`. Every command that samples (generate, eval, bench, the Python API) uses this."""
    card = card_defaults or {}
    given = {"steps": steps, "sampler": sampler, "guidance": guidance}
    kind = {"steps": int, "sampler": str, "guidance": float}
    values, source = {}, {}
    for key, value in given.items():
        if value is not None:  # the caller's value as given (the pipeline checks it)
            values[key], source[key] = value, "given"
        elif card.get(key) is not None:
            values[key], source[key] = kind[key](card[key]), "card"
        else:
            values[key], source[key] = FALLBACK_SAMPLING[key], "fallback"
    return SamplingSettings(values["steps"], values["sampler"], values["guidance"], source)
