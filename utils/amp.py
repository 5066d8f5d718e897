"""Precision settings shared by training, evaluation and benchmarking, and the loss scaler.

``amp`` is False (the default everywhere: fp32, as the official code), True or 'auto'.
True: bf16 autocast on CUDA (fp16 with a GradScaler on GPUs without bf16) and on CPUs with native bf16
(AVX512-BF16 / AMX through oneDNN); a CPU without it is an error. 'auto': as True where supported, else fp32.
The measured effect of ``--amp`` on speed and metrics is in docs/performance.md.
"""
import contextlib
import functools

import torch

from utils.errors import ConfigError


def cpu_supports_bf16():
    """True when oneDNN has native bf16 kernels on this CPU."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def amp_dtype(device, amp=False):
    """The autocast dtype for ``device`` under the ``amp`` setting, or None for fp32."""
    device = torch.device(device)
    if amp is False:
        return None
    if device.type == "cuda":
        # native bf16 only (Ampere and later): emulated bf16 (V100, T4) is slow; those GPUs get fp16 + GradScaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu":
        if cpu_supports_bf16():
            return torch.bfloat16
        if amp is True:
            raise ConfigError("--amp (amp: true) needs CUDA or a CPU with native bf16 (AVX512-BF16/AMX): use --no-amp, "
                              "or amp: auto (bf16 where the device has it)")
    return None


def autocast_context(device, amp=False):
    """A factory of autocast contexts for ``device`` under ``amp`` (a null context for fp32)."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def describe(device, amp=False):
    """Human-readable precision, e.g. 'bf16 autocast' or 'fp32', for logs."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return "fp32"
    return "fp16 autocast + grad scaler" if dtype == torch.float16 else "bf16 autocast"


class LossScaler:
    """Backward, gradient clipping and the optimizer step in one place (MAE's ``NativeScaler``).

    Holds a ``torch.amp.GradScaler`` that is enabled only under fp16 autocast; disabled, its scale,
    unscale and step calls are the plain backward and ``optimizer.step()``.
    """

    def __init__(self, device, amp=False):
        device = torch.device(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)

    def __call__(self, loss, optimizer, *, clip_grad=None, update_grad=True):
        """Backpropagate ``loss``; then, when ``update_grad`` (the last micro-batch of an accumulation
        group), :meth:`step`. Returns the gradient norm before clipping when it steps with clipping."""
        self.scaler.scale(loss).backward()
        return self.step(optimizer, clip_grad=clip_grad) if update_grad else None

    def step(self, optimizer, *, clip_grad=None):
        """Unscale, clip the gradient norm of the optimizer's parameters to ``clip_grad`` (None: no
        clipping) and step (skipped by the GradScaler when fp16 gradients overflowed). Without any gradient
        (every image of an accumulation group unreadable) there is nothing to step: skipped (an enabled
        GradScaler would fail: it found no gradient to check for overflow)."""
        if all(p.grad is None for group in optimizer.param_groups for p in group["params"]):
            return None
        norm = None
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state:
            self.scaler.load_state_dict(state)
