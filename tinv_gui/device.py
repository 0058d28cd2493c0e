"""Where models run and in which precision: the one place that decides.

Frozen weights are stored in `weight_dtype`; the forward pass runs under autocast in
`autocast_dtype` where the device supports it; trainable vectors always stay float32 (a master
copy), so small updates are never rounded away.

Half precision is chosen where the hardware computes it fast, and then frozen weights are stored
in it once: under autocast, matrix products and convolutions take them as they are, while the
operations autocast keeps in float32 (and the loss, computed on float32 predictions) upcast their
inputs. Weights kept in float32 under autocast would be cast again at every use, and the backward
pass would hold those casts too: a second copy of the model (0.85 GB for SD 1.5 on a CPU).

On request (`fp8_weights`), the denoiser's and T5's linear weights are stored in 8-bit floats and
upcast one layer at a time (`store_linear_weights`): half their bytes, so SD 3.5 Large and Flux.1-dev
fit a 24 GB GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FP8 = torch.float8_e4m3fn  # 8-bit weights: 3 mantissa bits, largest value 448


@dataclass(frozen=True)
class Placement:
    """A device and the dtypes to use on it."""

    device: torch.device
    weight_dtype: torch.dtype  # dtype of frozen weights
    autocast_dtype: torch.dtype | None  # None: plain fp32 compute
    # fp32 compute on a CPU with the idle VAE and the text encoders' linear weights stored in bf16
    # (about 0.3 GB less for SD 1.5, one rounding of those weights): the automatic choice's, never
    # an explicit --precision fp32's, which stays exact fp32.
    lean_storage: bool = False
    # The denoiser's and T5's linear weights stored in fp8 and computed in the weights' dtype
    # (store_linear_weights): half the bytes of bf16, at the cost of one rounding of those weights.
    fp8_weights: bool = False
    reason: str = field(default="", compare=False, repr=False)  # why this precision, for the log

    def autocast(self):
        """Context manager running the forward pass in the chosen mixed precision (or not at all)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self, why: bool = True) -> str:
        """E.g. "cpu (bf16 weights, bf16 compute: automatic: this CPU computes bf16 natively
        (avx512_bf16), faster than fp32)"; without `why`, only the device and dtypes."""
        compute = "fp32" if self.autocast_dtype is None else _short(self.autocast_dtype)
        what = f"{_short(self.weight_dtype)} weights, {compute} compute"
        if self.lean_storage:
            what += ", VAE and text encoder stored in bf16"
        if self.fp8_weights:
            what += ", denoiser's and T5's linear weights stored in fp8"
        return f"{self.device.type} ({what}{': ' + self.reason if why and self.reason else ''})"


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


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


# oneDNN's instruction-set levels, lowest first; bf16 is native from AVX512_CORE_BF16 on.
# (ONEDNN_MAX_CPU_ISA caps oneDNN at one of them: a CPU with bf16 then computes as one without.)
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX")


def cpu_bf16_flag() -> str | None:
    """The CPU flag that makes bf16 fast here ("amx_bf16" or "avx512_bf16"), or None.

    Measured (benchmarks/bench_textual_inversion.py, README "Measured speed"): with avx512_bf16
    a textual inversion step in bf16 takes half the time of fp32; with AVX-512 but no bf16
    instructions (oneDNN emulates them) twice the time; with AVX2 only, bf16 is 5 to 17 times
    slower for every kind of work (benchmarks/bench_precision.py). So bf16 only where a flag says
    the instructions are there, and oneDNN is not capped below them."""
    if _onednn_cap_below_bf16():
        return None
    flags = cpu_flags()
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def _onednn_cap_below_bf16() -> str | None:
    """The oneDNN ISA cap from the environment when it is below native bf16, else None."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_ISAS and _ONEDNN_ISAS.index(cap) < _ONEDNN_ISAS.index("AVX512_CORE_BF16"):
        return cap
    return None


def _why_no_bf16() -> str:
    cap = _onednn_cap_below_bf16()
    if cap:
        return f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from native bf16, so fp32, the faster there"
    return "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so fp32, the faster there"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:  # not Linux: no flags known, so fp32
        return set()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX512-BF16); emulated bf16 is slower than fp32."""
    return cpu_bf16_flag() is not None


def choose_placement(device: str = "auto", precision: str = "auto", fp8_weights: bool = False) -> Placement:
    """Pick the device and dtypes.

    auto: CUDA runs bf16 where the GPU has it (Ampere and newer), fp16 otherwise; MPS runs fp32
    (its autocast for training is still incomplete); the CPU runs bf16 only when it has native
    bf16 instructions, else fp32. Every kind of work (a diffusion step, CLIP-space training and
    prompt search, generation) spends its time in the same matrix products and convolutions, so
    one choice serves them all, and training and generation share one loaded pipeline.
    Half precision stores the frozen weights in it once (see the module's docstring).
    `fp8_weights` stores the denoiser's and T5's linear weights in fp8 (not on MPS, which has no
    8-bit floats).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = pick_device(device)
    if fp8_weights and dev.type == "mps":
        raise ValueError(
            "8-bit weights (--fp8-weights) need 8-bit floats, which Apple's MPS does not have in PyTorch: turn 8-bit weights "
            "off (--no-fp8-weights), or run on the CPU (--device cpu) or a CUDA GPU"
        )
    reason = f"--precision {precision}"
    automatic = precision == "auto"
    if automatic:
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reason = "automatic: " + ("the GPU computes bf16" if precision == "bf16" else "the GPU has no bf16")
        elif dev.type == "cpu" and cpu_has_fast_bf16():
            precision = "bf16"
            reason = f"automatic: this CPU computes bf16 natively ({cpu_bf16_flag()}), faster than fp32"
        else:
            precision = "fp32"
            reason = "automatic: " + (_why_no_bf16() if dev.type == "cpu" else f"{dev.type} trains in fp32")
    if precision == "fp32":
        return Placement(dev, torch.float32, None, lean_storage=automatic and dev.type == "cpu", fp8_weights=fp8_weights, reason=reason)
    if precision == "fp16" and dev.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use --precision bf16 or fp32")
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    # MPS keeps fp32 weights: its kernels for stored half weights under autocast are incomplete.
    return Placement(dev, torch.float32 if dev.type == "mps" else half, half, fp8_weights=fp8_weights, reason=reason)


def store_in_bf16_between_calls(module: torch.nn.Module) -> None:
    """Keep `module`'s weights in bf16 while it is idle and run every call in fp32.

    For a part of an fp32 pipeline that a training step never runs: the VAE (it encodes the
    pictures once, before the steps, and decodes generated pictures). Each of its children is
    converted to fp32 for the length of its own call, floating-point inputs too, and back to bf16
    after it: bf16 to fp32 and back is exact, so only the one rounding at loading differs from
    fp32 weights (about 0.4% of each weight, well below what a picture's 8 bits show), and the
    step's peak holds half the VAE's bytes (0.16 GB for SD 1.5)."""

    def upcast(child, args, kwargs):
        child.to(torch.float32)
        return tuple(_as_fp32(a) for a in args), {k: _as_fp32(v) for k, v in kwargs.items()}

    def store(child, _args, _kwargs, _output):
        child.to(torch.bfloat16)
        release_freed_memory()  # the fp32 copy's pages, not kept by glibc for later

    for child in module.children():
        child.to(torch.bfloat16)
        child.register_forward_pre_hook(upcast, with_kwargs=True)
        child.register_forward_hook(store, with_kwargs=True, always_call=True)


def store_linear_weights(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None) -> None:
    """Store the weights of `module`'s linear layers in `dtype` (bf16 or FP8) and compute each
    product in the dtype the weight had (under autocast, in the autocast dtype).

    Nearly all of a text encoder's or denoiser's bytes are in linear layers, and a training step
    runs them with gradients. Each layer multiplies by a copy upcast for that product and keeps
    only its stored weight for the backward pass (which makes its own copy), so the step's peak
    holds the stored bytes, not the upcast ones. (diffusers' `enable_layerwise_casting` upcasts
    the same way, but under autograd every layer's upcast copy stays saved for the backward pass:
    measured in benchmarks/bench_fp8.py, a step would hold the whole model in bf16 again.)

    FP8 weights are scaled per output row (the row's largest size / 448, fp8's largest value)
    before rounding, where ComfyUI's and OneTrainer's scaled fp8 take one scale per tensor and a
    plain cast (kohya's --fp8_base, diffusers' layerwise casting) none: small weights would
    otherwise fall among fp8's few subnormal values (measured in benchmarks/bench_fp8.py), and
    a row's scale costs 4 bytes and a multiply per weight at upcast. They are held as int8 bytes (a view of the fp8
    values), as 8-bit quantized weights are, so the libraries' dtype logic leaves them alone: T5
    casts its activations to `wo.weight.dtype` unless it is int8, diffusers gives the model's
    dtype from its first floating-point parameter, and `module.to(dtype)` converts only floats.

    `device`: where to convert them, one layer at a time (a GPU: the model reaches it in 8 bits,
    never whole in bf16). Biases, normalizations, convolutions and token tables stay as they are."""
    for layer in module.modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        weight = layer.weight.data if device is None else layer.weight.data.to(device)
        compute_dtype, scale = weight.dtype, None
        if dtype == FP8:
            scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny) / torch.finfo(FP8).max
            weight = (weight.float() / scale).to(FP8).view(torch.int8)
        else:
            weight = weight.to(dtype)
        layer.weight.requires_grad_(False)  # frozen: only the inputs get a gradient
        layer.weight.data = weight
        layer.register_buffer("weight_scale", scale, persistent=False)
        layer.forward = functools.partial(_linear_from_stored, layer, compute_dtype)
    # The rest moves to memory of its own: diffusers maps the checkpoint file and its tensors read
    # from that mapping, which would keep the converted weights' original pages resident too.
    if device is None:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.dtype not in (dtype, torch.int8):
                tensor.data = tensor.data.clone()


def _linear_from_stored(layer: torch.nn.Linear, compute_dtype: torch.dtype, inputs: torch.Tensor) -> torch.Tensor:
    return _LinearFromStored.apply(inputs, layer.weight, layer.weight_scale, layer.bias, compute_dtype)


def _upcast(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return weight.to(dtype)
    return weight.view(FP8).to(dtype).mul_(scale.to(dtype))


class _LinearFromStored(torch.autograd.Function):
    """y = x W^T + b from a frozen W stored in fewer bits: W's upcast copy lives for one product,
    and the backward pass gives the gradient with respect to x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, inputs, weight, scale, bias, compute_dtype):
        ctx.save_for_backward(weight, scale)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, inputs.dtype
        if not torch.is_autocast_enabled(inputs.device.type):
            inputs = inputs.to(compute_dtype)  # as a layer with weights in compute_dtype requires
        return torch.nn.functional.linear(inputs, _upcast(weight, scale, compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale = ctx.saved_tensors
        weight = _upcast(weight, scale, ctx.compute_dtype)
        return (grad_output.to(weight.dtype) @ weight).to(ctx.input_dtype), None, None, None, None


def _as_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


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
