"""Where models run and in which precision: the one place that decides.

Frozen weights are stored in `weight_dtype`; the forward pass runs under autocast in
`autocast_dtype` where the device supports it; trainable vectors always stay float32 (a master
copy), so small updates are never rounded away.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Placement:
    """A device and the dtypes to use on it."""

    device: torch.device
    weight_dtype: torch.dtype  # dtype of frozen weights
    autocast_dtype: torch.dtype | None  # None: plain fp32 compute

    def autocast(self):
        """Context manager running the forward pass in the chosen mixed precision (or not at all)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        mixed = "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", "")
        return f"{self.device.type} ({mixed})"


def pick_device(device: str = "auto") -> torch.device:
    """CUDA if present, then Apple's MPS, else the CPU; or exactly what the user named."""
    if device and device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is visible to PyTorch; use --device cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} was asked for, but MPS is not available here; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX512-BF16); emulated bf16 is slower than fp32."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AMX" in capability.upper():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """Pick the device and dtypes.

    auto: CUDA runs fp16 weights with bf16 autocast where the GPU has bf16 (Ampere and newer),
    fp16 otherwise; MPS runs fp32 (its autocast for training is still incomplete); the CPU runs
    bf16 autocast only when it has native bf16 instructions, else fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = pick_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif dev.type == "cpu" and cpu_has_fast_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return Placement(dev, torch.float32, None)
    if precision == "fp16" and dev.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use --precision bf16 or fp32")
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    # Frozen weights in half precision halve memory on GPUs; on the CPU keep fp32 weights and
    # let autocast convert, since CPU kernels for stored half weights are often slower.
    weight_dtype = half if dev.type == "cuda" else torch.float32
    return Placement(dev, weight_dtype, half)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None


def release_freed_memory() -> None:
    """Give the memory freed during a training step back to the system (glibc's malloc_trim).

    glibc otherwise keeps freed memory for reuse, fragmented, and a textual inversion loop's
    resident memory grows by about 0.6 GB over its first steps (SD 1.5, 512 px, CPU). Trimming
    once a step costs little; making every large allocation a fresh mapping instead (a lower
    mmap threshold) saved as much but made each step 60% slower. Elsewhere than glibc, nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
