"""Run an ONNX export (``pocketdiff export --format onnx``) with onnxruntime and pocketdiff's samplers.

The three sessions stand in for the torch modules inside :class:`pocketdiff.pipeline.Pipeline`, so
prompts, CFG, samplers, seeds and timings are the same code as the torch backend.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import PocketdiffError


class _Graph:
    def __init__(self, folder: Path, entry: dict, threads: int | None):
        from ..export.onnx import session

        path = folder / entry["file"]
        if not path.is_file():
            raise PocketdiffError(f"{path}: missing; re-export the model")
        self.session = session(path, threads)
        self.names = [i["name"] for i in entry["inputs"]]
        self.config = SimpleNamespace(**entry.get("config", {}))

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        feed = {n: t.detach().contiguous().numpy() for n, t in zip(self.names, tensors) if t is not None}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def eval(self):
        return self


class OrtTextEncoder(_Graph):
    def __call__(self, input_ids):
        return (self.run(input_ids.to(torch.int64)),)


class OrtUNet(_Graph):
    def __call__(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, return_dict=False):
        side = self.config.sample_size
        if tuple(sample.shape[-2:]) != (side, side):
            raise PocketdiffError(f"this ONNX export runs {side * self.scale}x{side * self.scale} px only (its fixed "
                                  f"size); drop --height/--width or re-export")
        if (timestep_cond is None) != (getattr(self.config, "time_cond_proj_dim", None) is None):
            raise PocketdiffError("the exported UNet's guidance embedding does not match the sampler's inputs")
        return (self.run(sample, timestep.float(), encoder_hidden_states, timestep_cond),)


class OrtDecoder(_Graph):
    def decode(self, z, return_dict=False):
        return (self.run(z),)


def load_onnx_pipeline(folder: str | Path, manifest: dict, threads: int | None = None):
    from ..folder import load_tokenizer, read_json
    from ..pipeline import Pipeline

    folder = Path(folder)
    comps = manifest.get("components", {})
    missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in comps]
    if manifest.get("format") != "onnx" or missing:
        what = f"format {manifest.get('format')!r}" if manifest.get("format") != "onnx" else f"no {', '.join(missing)}"
        raise PocketdiffError(f"{folder}: not a complete ONNX export of pocketdiff ({what}); "
                              "create one with: pocketdiff export MODEL --format onnx -o DIR")
    unet = OrtUNet(folder, comps["unet"], threads)
    vae = OrtDecoder(folder, comps["vae_decoder"], threads)
    unet.scale = 2 ** (len(vae.config.block_out_channels) - 1)
    pipe = Pipeline(unet, vae, OrtTextEncoder(folder, comps["text_encoder"], threads),
                    load_tokenizer(folder / "tokenizer"), read_json(folder / "scheduler" / "scheduler_config.json"),
                    runner="eager", name=folder.name)
    pipe.source = folder
    from ..models.registry import model_card

    pipe.defaults = model_card(folder).get("defaults", {})  # exports carry the source's card
    return pipe
