"""Post-training quantization: int8 weights, float activations.

``core`` holds the format, the int8 modules and the runtimes (torch only; ``folder`` loads quantized components
with it); :mod:`pocketdiff.quantize` writes quantized folders (``pocketdiff quantize``) and checks them, above
``folder``.
"""

from .core import (MODES, QUANT_FILE, RUNTIMES, QuantConv2d, QuantLinear, QuantSpec, convert, dequantize_per_channel,
                   quantize_module, quantize_per_channel, quantized_state_dict)

__all__ = ["MODES", "QUANT_FILE", "RUNTIMES", "QuantConv2d", "QuantLinear", "QuantSpec", "convert",
           "dequantize_per_channel", "quantize_module", "quantize_per_channel", "quantized_state_dict"]
