"""Where and in what dtype the parts run: device and dtype resolution, the CPU's bf16 abilities."""
from __future__ import annotations

from pathlib import Path

import torch

# x86 /proc/cpuinfo flags of bf16 dot-product instructions, which PyTorch's CPU GEMMs (oneDNN) use for bf16
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what the denoiser and text encoder run in ("auto": below)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """What ``dtype="auto"`` means on ``device``: bfloat16 on CUDA (Wan's own inference dtype); on a CPU, bfloat16
    only where it multiplies bf16 natively (``NATIVE_BF16_FLAGS``), else float32. Without those instructions
    PyTorch converts bf16 matmuls to fp32 and back: a tiny denoiser step ran ~9x slower in bf16 than in fp32
    on an AVX2 AMD EPYC; with AMX a bf16 matmul is several times faster than fp32. Other devices: float32."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and set(NATIVE_BF16_FLAGS) & cpu_flags():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """A name of ``DTYPES`` or a torch dtype -> the torch dtype (``"auto"``: ``default_dtype(device)``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux x86); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()
