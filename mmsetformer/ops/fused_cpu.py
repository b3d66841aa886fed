"""Fused SeT on the CPU: the compiled kernel of ``csrc/set_cpu.cpp``.

Each (batch, head) slice runs start to finish on one thread with its
kernel in a per-thread workspace (cache-resident for small slices), one
fused sweep per Sinkhorn iteration, and the backward rebuilds the kernel
instead of keeping it: no n x m tensor outlives a call.  Built by
``pip install -e .`` (``setup.py``); where it is missing, or the CPU lacks
the instructions it was built for, :func:`available` is False and the
reference runs.
"""
import platform
from typing import Optional

import torch
from torch import Tensor

from .set_attention import _grads_from_slices, _to_slices

try:
    from . import _set_cpu as _ext
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built (pure-Python install)
    _ext, _IMPORT_ERROR = None, e


def _cpu_supported() -> bool:
    # x86 builds use AVX2 + FMA (Intel since Haswell, AMD since Zen)
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return True
    return torch.backends.cpu.get_cpu_capability() != 'DEFAULT'


_SUPPORTED = _ext is not None and _cpu_supported()


def available() -> bool:
    """Whether the compiled CPU kernel can run here."""
    return _SUPPORTED


def why_unavailable() -> str:
    if _ext is None:
        return (f'mmsetformer.ops._set_cpu is not built ({_IMPORT_ERROR}); '
                'run `pip install --no-build-isolation -e .` (or '
                '`make install`)')
    if not _SUPPORTED:
        return 'this CPU lacks AVX2/FMA, which the kernel was built for'
    return ''


class SeTCPUFunction(torch.autograd.Function):
    """Same contract as the reference ``_SeTFunction``: (qf (B,h,n,d'),
    rf (1,h,m,d'), v (B,h,n,d), T) -> y (B,h,n,d), CPU, fp32 or fp64."""

    @staticmethod
    def forward(ctx, qf: Tensor, rf: Tensor, v: Tensor, num_iters: int):
        B, h, n, d = v.shape
        qf3, rf3, v3 = _to_slices(qf, rf, v)
        y, *saved = _ext.forward(qf3, rf3, v3, num_iters)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(qf3, rf3, v3, y, *saved)
            ctx.dims = B, h
        return y.view(B, h, n, d)

    @staticmethod
    def backward(ctx, gy: Tensor):
        qf3, rf3, v3, y, *saved = ctx.saved_tensors
        B, h = ctx.dims
        need_q, need_r = ctx.needs_input_grad[:2]
        gq, gr, gv = _ext.backward(qf3, rf3, v3, y,
                                   gy.reshape(y.shape).contiguous(), *saved,
                                   need_q, need_r)
        return _grads_from_slices(B, h, gq if need_q else None,
                                  gr if need_r else None, gv)
