"""Put a trained run's model folder inside the package as a shipped model, with an honest card.

One function for every stage (teacher, KD student, LCM student), so shipping is a command rather than a
script retyped per session::

    python -m pocketdiff.models.ship runs/kd/model shapes-mobile-lite \\
        --description "..." --recipe "pocketdiff train kd ..." --teacher shapes-teacher

The card keeps the previous card's generation defaults, drops its measured quality (the weights changed,
so the numbers must be measured again: `benchmarks/shapes_compare.py --card` or `shapes_quality.py
--write-card` write them), and records the recipe and the total number of steps trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import PocketdiffError
from ..folder import atomic_folder, store_half
from .registry import MODELS_DIR, model_card

STALE = ("quality", "model", "init_from", "steps_this_run")  # card keys about the previous weights or the run


def ship_model(src: str | os.PathLike, name: str, *, description: str, recipe: str, teacher: str | None = None,
               continues: bool = False, history: str | None = None, vae: str | os.PathLike | None = None,
               models_dir: str | os.PathLike = MODELS_DIR) -> Path:
    """Copy ``src`` to ``models_dir/name`` (UNet stored float16), replacing a shipped folder of that name.

    ``vae``: a VAE folder (e.g. ``train decoder``'s OUT/vae) shipped in place of ``src``'s own; its
    ``quality.json`` report goes into the card.

    ``continues``: the run continued the shipped weights without ``--init-from`` (e.g. ``train lcm --student
    <shipped LCM>``), so the card's ``steps_trained`` is the previous total plus this run's steps. Runs with
    ``--init-from`` already count the continued folder's steps (``trainer.steps_card``).
    """
    src, dst = Path(src), Path(models_dir) / name
    if not (src / "model_index.json").is_file():
        raise PocketdiffError(f"{src}: not a model folder (no model_index.json); pass a run's model/ folder")
    new = model_card(src)
    if "steps_trained" not in new:
        raise PocketdiffError(f"{src}: its pocketdiff.json has no steps_trained; ship a folder written by train")
    prev = model_card(dst) if dst.is_dir() else {}
    if continues and "init_from" in new:
        raise PocketdiffError(f"{src}: its card already counts the steps of the folder it continued (init_from); "
                              "drop --continues")
    if continues and "steps_trained" not in prev:
        raise PocketdiffError(f"{dst}: nothing shipped to continue from; drop --continues")
    vae_report = None
    if vae is not None:
        from ..folder import load_vae

        own = json.loads((src / "vae" / "config.json").read_text())["latent_channels"]
        new_vae = load_vae(vae)
        if new_vae.config.latent_channels != own:
            raise PocketdiffError(f"{vae}: its latents ({new_vae.config.latent_channels} channels) do not fit {src}")
        report = Path(vae) / "quality.json"
        vae_report = json.loads(report.read_text()) if report.is_file() else {}
        vae_report.pop("recipe", None)

    card = {k: v for k, v in new.items() if k not in STALE}
    card["description"] = description
    card["defaults"] = prev.get("defaults", new.get("defaults", {}))
    card["steps_trained"] = int(new["steps_trained"]) + (int(prev["steps_trained"]) if continues else 0)
    card["training"] = {"recipe": recipe, **({"history": history} if history else {}),
                        "weights": "UNet stored in float16 (folder.store_half), loaded as float32"}
    if teacher:
        card["teacher"] = teacher
    if vae_report is not None:
        card["vae"] = {"folder": str(vae), **vae_report}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(dst, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if vae is not None:
            shutil.rmtree(tmp / "vae")
            shutil.copytree(vae, tmp / "vae", ignore=shutil.ignore_patterns("quality.json", "README.md"))
        store_half(tmp)
        (tmp / "pocketdiff.json").write_text(json.dumps(card, indent=2))
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pocketdiff.models.ship", description=__doc__.splitlines()[0])
    p.add_argument("src", help="a trained run's model folder, e.g. runs/kd/model")
    p.add_argument("name", help="shipped name, e.g. shapes-mobile-lite")
    p.add_argument("--description", required=True)
    p.add_argument("--recipe", required=True, help="the command(s) that trained it, for the card")
    p.add_argument("--history", help="anything else a reader of the card needs (loss changes, restarts)")
    p.add_argument("--teacher", help="shipped name of the model it was distilled from")
    p.add_argument("--continues", action="store_true", help="the run continued the shipped weights")
    p.add_argument("--vae", help="a VAE folder to ship in place of the run's own (e.g. runs/decoder/vae)")
    a = p.parse_args(argv)
    try:
        dst = ship_model(a.src, a.name, description=a.description, recipe=a.recipe, teacher=a.teacher,
                         continues=a.continues, history=a.history, vae=a.vae)
    except PocketdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"shipped {dst} ({model_card(dst)['steps_trained']} steps); measure it again before committing")


if __name__ == "__main__":
    main()
