"""GPU kernels for the converted model (optional: they need triton and, compiled, a CUDA device).

``decode_attention`` is the fused one-token attention over the MHA2MLA cache (Triton, split-K);
``decode_attention_reference`` states the same contract in PyTorch; ``dispatch.absorbed_decode``
decides, per call, which of the two the converted model's absorbed decode uses. Importing this
package does not import triton.
"""
from .decode_attention import DecodeKernelConfig, decode_attention, decode_attention_reference

__all__ = ["DecodeKernelConfig", "decode_attention", "decode_attention_reference"]
