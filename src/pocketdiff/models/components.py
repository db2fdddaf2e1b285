"""Trained components shipped inside the package (not whole pipelines), e.g. the Shapes VAE.

The Shapes VAE is the expensive, reusable first stage of the teacher recipe: shipping it lets
``pocketdiff train teacher --vae shapes-vae`` start at the UNet, and ``train vae --init-from`` continue it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PocketdiffError

COMPONENTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "components"


def shipped_components() -> dict[str, Path]:
    if not COMPONENTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(COMPONENTS_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_component(name_or_path: str | Path) -> Path:
    """A component folder path, or the name of a shipped component."""
    p = Path(name_or_path)
    if p.exists():
        return p
    comps = shipped_components()
    if str(name_or_path) in comps:
        return comps[str(name_or_path)]
    raise PocketdiffError(f"{name_or_path}: no such component folder or shipped component "
                          f"(shipped: {', '.join(comps) or 'none'})")
