"""Writing int8 model folders (``pocketdiff quantize``) and the parity probes that check them.

The format and the int8 modules are :mod:`pocketdiff.quant`'s (below ``folder``, which loads quantized components
with them); this module sits above ``folder`` and uses only its public API (``read_model_index``, ``component_class``, ``weight_stem``, ``weight_files``, ``read_json``,
``load_model``, ``atomic_folder``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ModelFolderError, PocketdiffError
from .folder import (atomic_folder, component_class, load_model, read_json, read_model_index, weight_files,
                      weight_stem)
from .quant.core import MODES, QUANT_FILE, QuantSpec, quantizable, quantized_state_dict


# ---- parity probes: one seeded forward per component kind ------------------------------------------
def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def _probe_unet(m: nn.Module) -> torch.Tensor:
    cfg, g = m.config, torch.Generator().manual_seed(0)
    s = _first(cfg.sample_size)
    x = torch.randn(1, cfg.in_channels, s, s, generator=g)  # (B, C, h, w)
    text = torch.randn(1, 16, _first(cfg.cross_attention_dim), generator=g)  # (B, L, D)
    dim = getattr(cfg, "time_cond_proj_dim", None)
    tcond = torch.randn(1, dim, generator=g) if dim else None  # (B, E)
    return m(x, torch.tensor([500.0]), encoder_hidden_states=text, timestep_cond=tcond, return_dict=False)[0]


def _probe_text_encoder(m: nn.Module) -> torch.Tensor:
    n = min(16, m.config.max_position_embeddings)
    return m(torch.arange(n).remainder(m.config.vocab_size)[None])[0]  # (1, L, D)


def _probe_vae(m: nn.Module) -> torch.Tensor:
    z = torch.randn(1, m.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, c, h, w)
    return m.decode(z, return_dict=False)[0]


PROBES: dict[str, Callable[[nn.Module], torch.Tensor]] = {
    "unet": _probe_unet, "text_encoder": _probe_text_encoder, "vae": _probe_vae,
}


@torch.no_grad()
def relative_error(reference: nn.Module, quantized: nn.Module, component: str = "unet") -> float:
    """||y_q - y|| / ||y|| of one seeded forward (the parity figure ``quantize_folder`` checks)."""
    y, y_q = PROBES[component](reference), PROBES[component](quantized)
    return float((y_q - y).norm() / y.norm().clamp_min(1e-12))


# ---- folders --------------------------------------------------------------------------------------
def quantize_folder(src: str | Path, dest: str | Path, mode: str = "weight_only", components=("unet",),
                    overwrite: bool = False, *, runtime: str = "int8", exclude: tuple[str, ...] = (),
                    max_rel_error: float = 0.05) -> Path:
    """Write ``dest``: ``src`` with int8 weights for ``components`` (the rest copied untouched).

    Atomic (nothing is left at ``dest`` on failure). Each quantized component is loaded back from the new
    folder and its output compared with the float one; above ``max_rel_error`` (relative L2) it fails.
    The model card ``pocketdiff.json`` gains a "quantization" entry with sizes and that error.
    """
    from safetensors.torch import save_file

    spec = QuantSpec(mode=mode, runtime=runtime)  # checks mode and runtime before any work
    components = tuple(components)
    unknown = [c for c in components if c not in PROBES]
    if unknown or not components:
        raise PocketdiffError(f"cannot quantize component {unknown[0] if unknown else 'none'!r}; "
                              f"choose from {', '.join(PROBES)}")
    src, dest = Path(src), Path(dest)
    index = read_model_index(src)
    if dest.resolve() != src.resolve() and dest.resolve().is_relative_to(src.resolve()):
        raise PocketdiffError(f"{dest}: inside the source folder {src}; choose a path outside it")
    for c in components:
        if (src / c / QUANT_FILE).exists():
            raise ModelFolderError(f"{src / c / QUANT_FILE}: {c} is already quantized; quantize the float folder")

    def skip_weights(folder: str, names: list[str]) -> list[str]:  # weights of quantized components are rewritten
        if Path(folder).resolve().parent != src.resolve() or Path(folder).name not in components:
            return []
        return [n for n in names if ".safetensors" in n or Path(n).suffix in (".bin", ".ckpt", ".pt", ".pth")]

    report = {}
    with atomic_folder(dest, overwrite) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=skip_weights)
        for c in components:
            cls = component_class(index, c)
            stem = weight_stem(cls)
            reference = load_model(src / c, cls)
            names = quantizable(reference, exclude)
            save_file(quantized_state_dict(reference, names), str(tmp / c / f"{stem}.safetensors"),
                      metadata={"format": "pt"})
            (tmp / c / QUANT_FILE).write_text(QuantSpec(mode, runtime, names).to_json())
            quantized = load_model(tmp / c, cls)  # through folder.load_model: proves the new files load
            err = relative_error(reference, quantized, c)
            if not err <= max_rel_error:
                raise PocketdiffError(f"{c}: int8 output differs from float by {err:.2%} (> {max_rel_error:.2%}); "
                                      f"keep it in float, or raise the limit (--max-error)")
            report[c] = {"modules": len(names), "rel_error": round(err, 6),
                         "bytes_before": sum(f.stat().st_size for f in weight_files(src / c, stem)),
                         "bytes_after": (tmp / c / f"{stem}.safetensors").stat().st_size}
            del reference, quantized
        card_path = src / "pocketdiff.json"
        card = read_json(card_path) if card_path.is_file() else {}
        card["quantization"] = {"method": spec.method, "mode": mode, "runtime": runtime, "activations": MODES[mode][1],
                                "source": src.resolve().name, "components": report}
        (tmp / "pocketdiff.json").write_text(json.dumps(card, indent=2))
    return dest
