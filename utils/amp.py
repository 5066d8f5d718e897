"""Mixed-precision settings shared by training, evaluation and benchmarking.

``amp`` is 'auto', True or False. CUDA: bf16 autocast where the GPU supports it, else fp16 with a
GradScaler. CPU: bf16 autocast where the CPU supports it natively (AVX512-BF16 / AMX through oneDNN),
else fp32; ``amp: true`` on a CPU without native bf16 is an error. On a 2-core AVX512-BF16 CPU bf16 trains
DeiT-S 1.6x faster than fp32 (README, Performance), but slows the tiny demo model down, so
config/demo.yaml turns it off.
"""
import contextlib
import functools

import torch

from utils.errors import ConfigError


def cpu_supports_bf16():
    """True when oneDNN has native bf16 kernels on this CPU."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def amp_dtype(device, amp="auto"):
    """The autocast dtype for ``device`` under the ``amp`` setting, or None for full precision."""
    device = torch.device(device)
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        if cpu_supports_bf16():
            return torch.bfloat16
        if amp is True:
            raise ConfigError("amp: true needs CUDA or a CPU with native bf16 (AVX512-BF16/AMX); use --no-amp")
    return None


def autocast_settings(device, amp="auto"):
    """``(autocast, scaler)``: a factory of autocast contexts and a GradScaler (fp16 only, else None)."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def describe(device, amp="auto"):
    """Human-readable precision, e.g. 'bf16 autocast' or 'fp32', for logs."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return "fp32"
    return "fp16 autocast + grad scaler" if dtype == torch.float16 else "bf16 autocast"
