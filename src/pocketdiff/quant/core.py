"""Int8 weights per output channel, activations in floating point (W8A16 / W8A32), stored as safetensors.

Symmetric per-output-channel quantization (the weight side of LLM.int8, Dettmers et al. 2022; torchao's
``Int8WeightOnlyConfig`` uses the same granularity): for a weight W of shape (C_out, ...),

    s_c = max|W_c| / 127,    Q_c = round(W_c / s_c) in [-127, 127],    so |W - s Q| <= s / 2 elementwise.

Storage: the component's usual safetensors file holds ``<name>.weight`` as int8 and ``<name>.weight_scale``
(float32, (C_out,)) for every quantized Linear/Conv2d, and ``quantization.json`` beside it lists them
(:class:`QuantSpec`). ``folder.load_model`` sees that file, builds :class:`QuantLinear`/:class:`QuantConv2d`
for the listed modules (:func:`swap_in_quantized`), loads the file and converts them (:func:`finish_quantized`):

- ``int8``     int8 weights stay in memory, dequantized in each forward (4x less weight memory, slower);
- ``dequant``  dequantized once at load into float Linear/Conv2d (float speed; only the folder is smaller);
- ``torchao``  Linear weights become torchao ``Int8Tensor`` (its int8 weight-only kernels), convs as ``int8``.

Mode ``dynamic`` also runs every Linear with torch's dynamic int8 kernels (activations quantized per call,
W8A8), from the same stored int8 weights and scales; Conv2d layers then follow the runtime.

This module is torch-only: ``folder`` imports it to load quantized components, and ``pocketdiff.quantize`` (which
writes them) sits above ``folder``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFolderError, PocketdiffError

QUANT_FILE = "quantization.json"
QMAX = 127  # symmetric int8: -128 is never used, so negation is exact

# mode -> (method written to quantization.json, what happens to activations)
MODES = {
    "weight_only": ("w8a16-per-channel", "float"),
    "dynamic": ("w8a8-dynamic-per-channel", "int8 per call (Linear), float (Conv2d)"),
}


# ---- tensors ------------------------------------------------------------------------------------
def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_out, ...) float -> int8 of the same shape and (C_out,) float32 scales, |w - s q| <= s / 2."""
    w = w.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)  # (C_out,)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))  # an all-zero channel stays zero
    q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s_c * Q_c in ``dtype``: (C_out, ...) int8 and (C_out,) scales."""
    return q.to(dtype) * scale.to(dtype).view(-1, *[1] * (q.dim() - 1))


# ---- modules ------------------------------------------------------------------------------------
class _QuantWeight(nn.Module):
    """int8 ``weight`` (C_out, ...) and float ``weight_scale`` (C_out,) buffers, plus a float bias."""

    def _init_buffers(self, shape: tuple, bias: bool, device) -> None:
        self.register_buffer("weight", torch.empty(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(shape[0], device=device))
        self.bias = nn.Parameter(torch.empty(shape[0], device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, m: nn.Module) -> "_QuantWeight":
        """The int8 version of a float Linear/Conv2d (its meta-device twin, then filled)."""
        q = cls.empty_like(m)
        q.weight, q.weight_scale = quantize_per_channel(m.weight)
        if m.bias is not None:
            q.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_per_channel(self.weight, self.weight_scale, dtype)


class QuantLinear(_QuantWeight):
    """y = x (s Q)^T + b, the int8 weight dequantized per call in the activations' dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), bias, device)

    @classmethod
    def empty_like(cls, m: nn.Linear) -> "QuantLinear":
        return cls(m.in_features, m.out_features, m.bias is not None, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C_in) -> (..., C_out)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class QuantConv2d(_QuantWeight):
    """2-D convolution with an int8 (C_out, C_in/groups, kh, kw) weight dequantized per call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride, self.dilation = nn.modules.utils._pair(stride), nn.modules.utils._pair(dilation)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self._init_buffers((out_channels, in_channels // groups, *self.kernel_size), bias, device)

    @classmethod
    def empty_like(cls, m: nn.Conv2d) -> "QuantConv2d":
        return cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                   m.bias is not None, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        return F.conv2d(x, self.dequantized_weight(x.dtype), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, int8")


def _quant_class(m: nn.Module):
    """The quantized replacement of a module, or None: exact Linear/Conv2d only (no LoRA or padded variants)."""
    if type(m) is nn.Linear:
        return QuantLinear
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        return QuantConv2d
    return None


def quantizable(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the Linear/Conv2d modules that :func:`quantize_module` would quantize."""
    return [n for n, m in model.named_modules() if _quant_class(m) is not None and n not in exclude]


def quantize_module(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Replace Linear/Conv2d modules by their int8 versions in place; returns the names replaced."""
    names = quantizable(model, exclude)
    for name in names:
        m = model.get_submodule(name)
        model.set_submodule(name, _quant_class(m).from_float(m))
    return names


def quantized_state_dict(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The float model's state with ``<name>.weight`` int8 and ``<name>.weight_scale`` added for ``names``."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name in names:
        w = state[f"{name}.weight"]
        if not torch.isfinite(w).all():
            raise PocketdiffError(f"{name}.weight holds inf or nan; fix the model before quantizing it")
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_per_channel(w)
    return state


# ---- runtimes: how int8 modules run after loading (registered by name) ---------------------------
RUNTIMES: dict[str, Callable[[nn.Module], None]] = {}


def register_runtime(name: str):
    def add(fn: Callable[[nn.Module], None]):
        RUNTIMES[name] = fn
        return fn
    return add


def _replace(model: nn.Module, kind: type, build: Callable[[nn.Module], nn.Module]) -> None:
    for name, m in [(n, m) for n, m in model.named_modules() if type(m) is kind]:
        model.set_submodule(name, build(m))


@register_runtime("int8")
def _runtime_int8(model: nn.Module) -> None:
    """Keep int8 weights in memory; QuantLinear/QuantConv2d dequantize per call."""


@register_runtime("dequant")
def _runtime_dequant(model: nn.Module) -> None:
    """Float Linear/Conv2d again, from the int8 weights (the folder stays small; memory and speed are float's)."""

    def linear(m: QuantLinear) -> nn.Linear:
        f = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
        f.weight, f.bias = nn.Parameter(m.dequantized_weight(), requires_grad=False), m.bias
        return f

    def conv(m: QuantConv2d) -> nn.Conv2d:
        f = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.bias is not None, device="meta")
        f.weight, f.bias = nn.Parameter(m.dequantized_weight(), requires_grad=False), m.bias
        return f

    _replace(model, QuantLinear, linear)
    _replace(model, QuantConv2d, conv)


def _import_torchao():
    """torchao's int8 tensor, with its import-time log lines (missing CUDA kernels) kept off stderr."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8Tensor
    except Exception as e:  # not installed, or built for another torch
        raise PocketdiffError(f"runtime 'torchao' needs the torchao package (pip install torchao, keeping torch; "
                              f"{type(e).__name__}); or use runtime int8 or dequant") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return Int8Tensor


@register_runtime("torchao")
def _runtime_torchao(model: nn.Module) -> None:
    """Linear weights as torchao ``Int8Tensor`` (same int8 values and scales; torchao's kernels)."""
    Int8Tensor = _import_torchao()

    def linear(m: QuantLinear) -> nn.Linear:
        f = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
        w = Int8Tensor(m.weight, m.weight_scale.view(-1, 1), [1, m.in_features], torch.float32)  # per-row block
        f.weight, f.bias = nn.Parameter(w, requires_grad=False), m.bias
        return f

    _replace(model, QuantLinear, linear)


def to_dynamic(model: nn.Module) -> None:
    """Every QuantLinear -> torch's dynamic int8 Linear with the same per-channel int8 weights (W8A8)."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:
        raise PocketdiffError("this torch has no dynamic int8 Linear (torch.ao.nn.quantized.dynamic); "
                              "use mode weight_only") from None

    def linear(m: QuantLinear) -> nn.Module:
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (still present)
            warnings.simplefilter("ignore")
            zero = torch.zeros(m.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(m.weight, m.weight_scale.double(), zero, 0)
            d = DynamicLinear(m.in_features, m.out_features, bias_=m.bias is not None, dtype=torch.qint8)
            d.set_weight_bias(qw, None if m.bias is None else m.bias.detach().float())
        return d

    _replace(model, QuantLinear, linear)


# ---- quantization.json ----------------------------------------------------------------------------
@dataclass
class QuantSpec:
    """What ``quantization.json`` says about one component."""

    mode: str = "weight_only"  # weight_only: activations stay float; dynamic: Linear activations int8 per call
    runtime: str = "int8"  # how int8 layers run after loading: int8 | dequant | torchao
    modules: list[str] = field(default_factory=list)  # quantized Linear/Conv2d module names
    weights: str = "int8-symmetric-per-output-channel"  # scale = max|w| / 127 per output channel
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.mode not in MODES:
            raise PocketdiffError(f"unknown quantization mode {self.mode!r}; choose {' or '.join(MODES)}")
        if self.runtime not in RUNTIMES:
            raise PocketdiffError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if self.mode == "dynamic" and self.runtime == "torchao":
            raise PocketdiffError("mode dynamic runs Linear layers with torch's dynamic int8 kernels; "
                                  "use runtime int8 or dequant with it")
        if not isinstance(self.modules, list) or not all(isinstance(n, str) for n in self.modules):
            raise PocketdiffError("'modules' must be a list of module names")
        if self.weights != "int8-symmetric-per-output-channel" or self.scale_dtype != "float32":
            raise PocketdiffError(f"unsupported weight format {self.weights}/{self.scale_dtype}")

    @property
    def method(self) -> str:
        return MODES[self.mode][0]

    def to_json(self) -> str:
        d = {"method": self.method, "activations": MODES[self.mode][1], **asdict(self)}
        return json.dumps(d, indent=2)

    @classmethod
    def read(cls, path: Path) -> "QuantSpec":
        try:
            d = json.loads(path.read_text())
            return cls(**{k: d[k] for k in ("mode", "runtime", "modules", "weights", "scale_dtype") if k in d})
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{path}: not a valid quantization file ({str(e).splitlines()[0][:80]}); "
                                   "re-run pocketdiff quantize") from None
        except PocketdiffError as e:
            raise ModelFolderError(f"{path}: {e}") from None


def convert(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Turn the QuantLinear/QuantConv2d modules of a loaded model into what ``spec`` asks for."""
    if spec.mode == "dynamic":
        to_dynamic(model)
    RUNTIMES[spec.runtime](model)
    return model


# ---- loading: the steps around folder.load_model's own state-dict loading ----------------------------
def swap_in_quantized(model: nn.Module, spec: QuantSpec, spec_path: Path, config_path: Path) -> None:
    """Replace each module ``spec`` lists by an empty (meta) QuantLinear/QuantConv2d of its shape, to be filled by
    the component's state dict."""
    for name in spec.modules:
        try:
            cls = _quant_class(model.get_submodule(name))
        except AttributeError:
            cls = None
        if cls is None:
            raise ModelFolderError(f"{spec_path}: lists {name!r}, which is no Linear/Conv2d of {config_path}; "
                                   "the two files do not belong together")
        model.set_submodule(name, cls.empty_like(model.get_submodule(name)))


def finish_quantized(model: nn.Module, spec: QuantSpec, spec_path: Path, weights_path: Path) -> nn.Module:
    """Check the loaded int8 weights and scales of the listed modules, then convert them to ``spec``'s runtime."""
    for name in spec.modules:
        m = model.get_submodule(name)
        if m.weight.dtype != torch.int8 or not m.weight_scale.is_floating_point() or not torch.isfinite(
                m.weight_scale).all():
            raise ModelFolderError(f"{weights_path}: {name}.weight is {m.weight.dtype} with "
                                   f"{m.weight_scale.dtype} scales, but {QUANT_FILE} lists it as int8; "
                                   "re-run pocketdiff quantize")
        m.weight_scale = m.weight_scale.float()
    try:
        convert(model, spec)
    except PocketdiffError as e:  # e.g. runtime torchao without torchao installed
        raise ModelFolderError(f"{spec_path}: {e}") from None
    return model.eval().requires_grad_(False)
