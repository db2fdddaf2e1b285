"""Post-training quantization of model folders (``pocketdiff quantize``): int8 weights, float activations."""

from .weight_only import (MODES, QUANT_FILE, RUNTIMES, QuantConv2d, QuantLinear, QuantSpec, convert,
                          dequantize_per_channel, load_quantized, quantize_folder, quantize_module,
                          quantize_per_channel, quantized_state_dict, relative_error)

__all__ = ["MODES", "QUANT_FILE", "RUNTIMES", "QuantConv2d", "QuantLinear", "QuantSpec", "convert",
           "dequantize_per_channel", "load_quantized", "quantize_folder", "quantize_module", "quantize_per_channel",
           "quantized_state_dict", "relative_error"]
