"""Load and save diffusers-format model folders, offline and safetensors-only.

A folder holds ``model_index.json`` and one sub-folder per component (unet/, vae/, text_encoder/,
tokenizer/, scheduler/). Every failure is a :class:`ModelFolderError` whose one-line message names the
file and the fix. Pickle weights (.bin/.ckpt/.pt) are refused unless ``trust_pickle=True``, and even
then are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFolderError
from .files import atomic_folder, save_tensors  # noqa: F401 (atomic_folder: part of this module's API)
from .text.tokenizer import save_tokenizer

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

# Library classes a folder may name. Anything else is refused (no arbitrary imports from a JSON file).
_DIFFUSERS_MODELS = ("UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny")
_TRANSFORMERS_MODELS = ("CLIPTextModel", "CLIPTextModelWithProjection")
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; the folder is not a complete diffusers model folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}); restore or re-save the file")


def read_model_index(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such model folder; pass --model a local diffusers folder")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: is a file, not a model folder; pass the folder that holds model_index.json")
    index = read_json(folder / "model_index.json")
    for name in REQUIRED:
        if name not in index or not (folder / name).is_dir():
            raise ModelFolderError(f"{folder / name}: component '{name}' is missing; the folder needs {', '.join(REQUIRED)}")
    return index


def component_class(index: dict, name: str) -> str:
    """The class name model_index.json gives component ``name`` (``["diffusers", "UNet2DConditionModel"]``)."""
    entry = index[name]
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else str(entry)


def weight_stem(class_name: str) -> str:
    """The weight file stem of a component class: diffusers' ``diffusion_pytorch_model``, transformers' ``model``."""
    return "diffusion_pytorch_model" if class_name in _DIFFUSERS_MODELS else "model"


def weight_files(sub: Path, stem: str) -> list[Path]:
    """Safetensors files of a component (one file or a sharded index), else raise naming what is there."""
    single = sub / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = sub / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (sub / s).is_file()]
        if missing:
            raise ModelFolderError(f"{sub / missing[0]}: shard listed in {index.name} is missing")
        return [sub / s for s in shards]
    return []


def _pickle_files(sub: Path) -> list[Path]:
    return sorted(p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def load_state_dict(sub: Path, stem: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a component's weights, from safetensors (or, if trusted, a pickle file)."""
    from safetensors.torch import load_file

    files = weight_files(sub, stem)
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state.update(load_file(str(f)))
            except Exception as e:  # safetensors raises its own error types on truncated headers/data
                raise ModelFolderError(f"{f}: truncated or corrupt safetensors file ({str(e).splitlines()[0][:80]}); "
                                       "restore or re-save it") from None
        return state
    pickles = _pickle_files(sub)
    if pickles and not trust_pickle:
        raise ModelFolderError(f"{pickles[0]}: pickle checkpoint refused (it can run code); convert it to safetensors, "
                               "or pass --trust-pickle if you trust its source")
    if pickles:
        try:
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelFolderError(f"{pickles[0]}: cannot read this pickle checkpoint ({str(e).splitlines()[0][:80]})") from None
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ModelFolderError(f"{sub / (stem + '.safetensors')}: missing; the component has no weights")


def _check_and_load(module: torch.nn.Module, state: dict, sub: Path, stem: str) -> None:
    """Strictly load ``state`` into ``module`` or explain the mismatch with its config in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    # transformers keeps some non-persistent buffers (e.g. position_ids) out of files: tolerate those
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensor(s) of the wrong shape (e.g. {k}: file {tuple(state[k].shape)} "
                         f"vs config {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ModelFolderError(f"{sub / stem}.safetensors does not match {sub / 'config.json'}: {'; '.join(parts)}; "
                               "use the config the weights were saved with")
    # float tensors take the module's dtype (fp32 here), as diffusers does for a half-precision file
    module.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v
                            for k, v in state.items()}, strict=False, assign=True)


def load_model(sub: Path, class_name: str, trust_pickle: bool = False) -> torch.nn.Module:
    """Build a diffusers or transformers model from ``sub/config.json`` and load its weights."""
    from accelerate import init_empty_weights

    config = read_json(sub / "config.json")
    if class_name in _DIFFUSERS_MODELS:
        import diffusers

        from .blocks.ops import OPS_KEY, apply_ops, buildable_config

        cls = getattr(diffusers, class_name)
        try:
            with init_empty_weights(include_buffers=False):  # pocketdiff's own keys: see _with_surgery
                model = cls.from_config(buildable_config(config))
            if config.get(OPS_KEY):  # MobileDiffusion's block operations reshape modules before the weights load
                model = apply_ops(model, config[OPS_KEY], carry=False)
        except Exception as e:
            raise ModelFolderError(f"{sub / 'config.json'}: not a valid {class_name} config ({str(e).splitlines()[0][:100]})") from None
        stem = "diffusion_pytorch_model"
    elif class_name in _TRANSFORMERS_MODELS:
        import transformers

        cls = getattr(transformers, class_name)
        try:
            cfg = cls.config_class(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
            with init_empty_weights(include_buffers=False):
                model = cls(cfg)
        except Exception as e:
            raise ModelFolderError(f"{sub / 'config.json'}: not a valid {class_name} config ({str(e).splitlines()[0][:100]})") from None
        stem = "model"
    else:
        raise ModelFolderError(f"{sub}: component class {class_name!r} is not supported "
                               f"(supported: {', '.join(_DIFFUSERS_MODELS + _TRANSFORMERS_MODELS)})")
    if (sub / "quantization.json").is_file():  # int8 weights written by `pocketdiff quantize`
        model = _load_quantized(model, sub, stem)
    else:
        state = load_state_dict(sub, stem, trust_pickle)
        _check_and_load(model, state, sub, stem)
    return _with_surgery(model.eval().requires_grad_(False), config, sub)


def _with_surgery(model: torch.nn.Module, config: dict, sub: Path) -> torch.nn.Module:
    """A UNet with the blocks its config removes (``pocketdiff_removed_blocks``) removed; others as they are."""
    from .blocks.surgery import REMOVED_KEY, apply_config

    if not config.get(REMOVED_KEY):
        return model
    try:
        return apply_config(model, config)
    except KeyError as e:
        raise ModelFolderError(f"{sub / 'config.json'}: {REMOVED_KEY} names {e.args[0]}") from None


def _load_quantized(model: torch.nn.Module, sub: Path, stem: str) -> torch.nn.Module:
    """Int8 weights into ``model`` (built on the meta device from config.json), converted to their runtime.

    Safetensors only: a quantized component never reads a pickle, ``--trust-pickle`` or not.
    """
    from .quant.core import QUANT_FILE, QuantSpec, finish_quantized, swap_in_quantized

    spec_path = sub / QUANT_FILE
    spec = QuantSpec.read(spec_path)
    if not weight_files(sub, stem):
        raise ModelFolderError(f"{sub / stem}.safetensors: missing; a quantized component is read from "
                               "safetensors only (pickle weights are refused)")
    swap_in_quantized(model, spec, spec_path, sub / "config.json")
    _check_and_load(model, load_state_dict(sub, stem, trust_pickle=False), sub, stem)
    return finish_quantized(model, spec, spec_path, sub / f"{stem}.safetensors")


_VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def load_vae(path: str | os.PathLike, trust_pickle: bool = False) -> torch.nn.Module:
    """A VAE folder on its own (config.json + weights: a model folder's ``vae/``, or what `train decoder` writes)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path}: not a VAE folder (no config.json); pass a folder such as MODEL/vae")
    class_name = read_json(path / "config.json").get("_class_name", "AutoencoderKL")
    if class_name not in _VAE_CLASSES:
        raise ModelFolderError(f"{path}: a {class_name}, not a VAE ({' or '.join(_VAE_CLASSES)})")
    return load_model(path, class_name, trust_pickle)


def load_tokenizer(sub: Path, class_name: str = "CLIPTokenizer"):
    if class_name not in _TOKENIZERS:
        raise ModelFolderError(f"{sub}: tokenizer class {class_name!r} is not supported (CLIPTokenizer)")
    from transformers import CLIPTokenizer

    if not (sub / "tokenizer.json").is_file() and not all((sub / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise ModelFolderError(f"{sub / 'vocab.json'}: missing; the tokenizer needs tokenizer.json or vocab.json and merges.txt")
    try:
        return CLIPTokenizer.from_pretrained(str(sub), local_files_only=True)
    except Exception as e:
        raise ModelFolderError(f"{sub}: cannot load the tokenizer ({str(e).splitlines()[0][:100]})") from None


def load_components(folder: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and the raw scheduler config of a folder."""
    folder = Path(folder)
    index = read_model_index(folder)

    def cls_of(name: str) -> str:
        return component_class(index, name)

    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    return {
        "unet": load_model(folder / "unet", cls_of("unet"), trust_pickle),
        "vae": load_model(folder / "vae", cls_of("vae"), trust_pickle),
        "text_encoder": load_model(folder / "text_encoder", cls_of("text_encoder"), trust_pickle),
        "tokenizer": load_tokenizer(folder / "tokenizer", cls_of("tokenizer")),
        "scheduler_config": scheduler_config,
        "model_index": index,
    }


def save_components(dest: str | os.PathLike, unet, vae, text_encoder, tokenizer, scheduler_config: dict,
                    overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write a folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads (safetensors)."""
    sched_cls = scheduler_config.get("_class_name", "DDIMScheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", type(unet).__name__],
        "vae": ["diffusers", type(vae).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", sched_cls],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    with atomic_folder(dest, overwrite) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        _guard_ops_config(tmp / "unet" / "config.json")
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        save_tokenizer(tokenizer, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        cfg = dict(scheduler_config)
        cfg["_class_name"] = sched_cls
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(dest)


def _guard_ops_config(path: Path) -> None:
    """A UNet with block operations saves its block types as ``pocketdiff:<type>``: stock diffusers then refuses to
    build it (one line naming pocketdiff) rather than load a different function."""
    from .blocks.ops import saved_config

    config = read_json(path)
    guarded = saved_config(config)
    if guarded is not config:
        path.write_text(json.dumps(guarded, indent=2, sort_keys=True))


def store_half(folder: str | os.PathLike, components: tuple[str, ...] = ("unet",)) -> dict[str, tuple[int, int]]:
    """Rewrite the float32 tensors of ``folder/<component>``'s safetensors file as float16, in place and atomically.

    Half the bytes on disk for shipping; loaders (pocketdiff's and diffusers' ``from_pretrained``) cast them
    back to the model's float32 on load, so only fp16 rounding of the weights (~5e-4 relative) changes.
    Returns ``{component: (bytes before, bytes after)}``.
    """
    from safetensors.torch import load_file

    out = {}
    for comp in components:
        files = sorted((Path(folder) / comp).glob("*.safetensors"))
        if len(files) != 1:
            raise ModelFolderError(f"{Path(folder) / comp}: expected one .safetensors file, found {len(files)}")
        path = files[0]
        state = load_file(str(path))
        bad = [k for k, v in state.items() if v.is_floating_point() and v.abs().max() > torch.finfo(torch.float16).max]
        if bad:
            raise ModelFolderError(f"{path}: {bad[0]} does not fit in float16; keep this component in float32")
        half = {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}
        before = path.stat().st_size
        save_tensors(half, path, metadata={"format": "pt"})
        out[comp] = (before, path.stat().st_size)
    return out
