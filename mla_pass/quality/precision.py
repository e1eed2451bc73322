"""Which autocast dtype makes training faster on this device, decided once per process.

bfloat16 autocast pays only where the hardware multiplies bf16 natively: on a CPU without bf16
instructions (AVX2 only) PyTorch emulates it and a matmul runs several times slower (measured:
two distillation steps of SmolLM2-135M took 16.7 CPU-s in float32 and 250 CPU-s under bf16). So
"auto" reads the CPU's flags first (no ``avx512_bf16`` / ``amx_bf16``: float32 at once, nothing
timed) and otherwise times a matmul of a transformer's shape in both dtypes, choosing bf16 only
when it is clearly faster. On CUDA, bf16 where the device supports it.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

AUTOCAST_CHOICES = ("auto", "bfloat16", "float16", None)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FASTER_BY = 1.25           # bf16 is chosen on CPU only when its matmul is this much faster than fp32


def resolve_autocast(choice: str | None, device: torch.device) -> tuple[str | None, str]:
    """``choice`` ("auto", "bfloat16", "float16" or None) → (the dtype to use or None, why)."""
    if choice not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice, "asked for"
    device = torch.device(device)
    if device.type == "cuda":
        return ("bfloat16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else (None, "CUDA without bf16")
    if device.type != "cpu":
        return None, f"{device.type}: float32"
    return _cpu_choice()


@functools.lru_cache(maxsize=1)
def _cpu_choice() -> tuple[str | None, str]:
    flags = cpu_flags()
    if flags is not None and not flags & set(BF16_CPU_FLAGS):
        return None, "the CPU has no bf16 instructions (no avx512_bf16/amx_bf16): float32"
    fp32, bf16 = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
    if fp32 / bf16 >= FASTER_BY:
        return "bfloat16", f"bf16 matmul {fp32 / bf16:.1f}× faster than float32 on this CPU"
    return None, f"bf16 matmul only {fp32 / bf16:.2f}× the speed of float32 on this CPU: float32"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def matmul_seconds(dtype: torch.dtype, m: int = 256, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """Median seconds of one [m, k] @ [k, n] matmul in ``dtype`` (a 135M model's MLP shape)."""
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = torch.randn(k, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    a @ b                                                 # first call: allocation, kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
