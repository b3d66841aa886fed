"""Fused SeT on the CPU: the compiled kernel of ``csrc/set_cpu.cpp``.

Each (batch, head) slice runs start to finish on one thread: it builds
its query features from q (a view of the layer's projection) in one pass,
then its kernel in a per-thread workspace (cache-resident for small
slices; rebuilt block by block on every pass for huge ones, see
``STREAM_BYTES``), one fused sweep per Sinkhorn iteration, and the
backward rebuilds the kernel instead of keeping it: no n x m tensor
outlives a call (the scratch memory it was built in is kept for the next
call, see ``CACHE_BYTES``).
Built by ``pip install -e .`` (``setup.py``); where it is missing, or the
CPU lacks the instructions it was built for, :func:`available` is False
and the reference runs.
"""
import importlib
import os
import platform
import threading
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .set_attention import (NORM_DELTA, FusedImplementation, heads_last,
                            module_setting)


def builds() -> Dict[str, object]:
    """The compiled builds this CPU runs, widest first: {'AVX512': module,
    'AVX2': module} on x86 (as ``torch.backends.cpu.get_cpu_capability()``
    reports the CPU, so ATen's ``ATEN_CPU_CAPABILITY=avx2`` narrows both),
    {machine: module} elsewhere; empty where none is built."""
    if platform.machine().lower() in ('x86_64', 'amd64'):
        cap = torch.backends.cpu.get_cpu_capability()
        names = {'AVX512': '_set_cpu_avx512', 'AVX2': '_set_cpu'}
        if not cap.startswith('AVX512'):
            names.pop('AVX512')
        if cap == 'DEFAULT':  # no AVX2/FMA
            names.clear()
    else:
        names = {platform.machine(): '_set_cpu'}
    found = {}
    for isa, name in names.items():
        try:
            found[isa] = importlib.import_module(f'.{name}', __package__)
        except ImportError:  # not built (pure-Python install)
            pass
    return found


def _load():
    """The widest build, its name, and why none runs (or '')."""
    found = builds()
    if found:
        isa, ext = next(iter(found.items()))
        return ext, isa, ''
    if torch.backends.cpu.get_cpu_capability() == 'DEFAULT' and \
            platform.machine().lower() in ('x86_64', 'amd64'):
        return None, '', 'this CPU lacks AVX2/FMA, which the kernel needs'
    return None, '', ('mmsetformer.ops._set_cpu is not built; run `pip '
                      'install --no-build-isolation -e .` (or `make '
                      'install`)')


_ext, ISA, _UNAVAILABLE = _load()

# A slice whose n x m kernel is larger than this streams it: every pass
# rebuilds its blocks of rows in a small buffer instead of reading a kernel
# kept in the workspace (csrc/set_cpu.cpp, KernelRows), so the workspace is
# O(n) instead of O(n m) per thread and time per token does not depend on
# n.  Measured (Intel Xeon, AVX-512, m = 750, T = 3, forward): rebuilding
# a block costs more than reading a kept one from DRAM (n = 50176: 190
# against 133 ms), twice as much in cache (n = 3136), and SeTformer-T at
# 800 x 1344 ran 8 % slower streaming stride 4; so it is kept up to sizes
# where its memory is the concern (1 GiB: e.g. n = 358k tokens at m = 750).
STREAM_BYTES = int(float(os.environ.get('MMSETFORMER_SET_CPU_STREAM_BYTES',
                                        2**30)))

# Slices run one after the other, each over all threads (row chunks),
# instead of one slice per thread, where the kernels kept by one slice per
# thread would add up to more than this: less in memory at once, so more
# of it is still in the last-level cache when the next pass reads it
# (csrc/set_cpu.cpp, slices_share_pool).  Measured, Intel Xeon, 2 threads,
# m = 750, T = 3, shared against one slice per thread, 2026-12-03: 36-37
# MiB kept by the two threads (n = 6272 x 2 heads, 6400 x 4): 0.83-0.87x
# the forward's time and 0.92-0.96x forward + backward's; 72-96 MiB:
# 0.79-0.81x and 0.88-0.91x; 146 MiB: 0.89x and 0.98x; 18-24 MiB (in
# cache: n = 3136, 4200): 0.95-0.96x forward but 1.00-1.05x forward +
# backward, so those stay one slice per thread.  (Another session's VM
# had one slice per thread 3 % faster at 2 x 38 MB, shared 1.16x faster
# at 2 x 150 MB: the crossover moves with the cache a VM gets.)
SHARE_BYTES = int(float(os.environ.get('MMSETFORMER_SET_CPU_SHARE_BYTES',
                                       2**25)))


def stream_above(nbytes: int):
    """Inside, slices whose kernel exceeds ``nbytes`` stream it (0: every
    slice); the default is :data:`STREAM_BYTES` as set at import."""
    return module_setting(globals(), 'STREAM_BYTES', nbytes)


def share_above(nbytes: int):
    """Inside, slices share the threads once the kernels of one slice per
    thread exceed ``nbytes`` (0: whenever a kernel is kept); the default is
    :data:`SHARE_BYTES` as set at import."""
    return module_setting(globals(), 'SHARE_BYTES', nbytes)


# The calls' scratch memory (the kept kernel and the blocks of the
# products) is one buffer per thread, kept from call to call and grown to
# the largest call, forward and backward alike.  A fresh buffer costs its
# page faults on first touch: measured (Intel Xeon, 2 slices of n = 50176,
# m = 750, T = 3), a forward took 196 ms in a fresh one and 153 ms in a
# kept one, 140 ms with the kept one on huge pages (forward + backward:
# 500 -> 402 ms); a training step paid it once per layer and pass.  Calls
# needing more than this many bytes get a buffer of their own, freed when
# they return.  empty_cache() frees it.
CACHE_BYTES = int(float(os.environ.get('MMSETFORMER_SET_CPU_CACHE_BYTES',
                                       4 * 2**30)))


class _Cache(threading.local):
    buf: Optional[Tensor] = None


_CACHE = _Cache()


def _scratch(elems: int, dtype: torch.dtype) -> Optional[Tensor]:
    """This thread's buffer as ``elems`` of ``dtype`` (contents undefined),
    or None: the kernel then allocates one for the call."""
    # tracers (jit, as the FLOP counter uses, and dynamo) would record the
    # buffer as a constant
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    nbytes = elems * torch.finfo(dtype).bits // 8
    if nbytes > CACHE_BYTES:
        return None
    if _CACHE.buf is None or _CACHE.buf.numel() < nbytes:
        _CACHE.buf = None  # release the old one before allocating
        buf = torch.empty(nbytes, dtype=torch.uint8)
        _ext.advise_huge_pages(buf)  # before anything touches it
        _CACHE.buf = buf
    return _CACHE.buf[:nbytes].view(dtype)


def empty_cache() -> None:
    """Free this thread's kept scratch buffer (the next call allocates
    one again)."""
    _CACHE.buf = None


def cached_bytes() -> int:
    """Bytes of this thread's kept scratch buffer."""
    return 0 if _CACHE.buf is None else _CACHE.buf.numel()


def available() -> bool:
    """Whether the compiled CPU kernel can run here."""
    return _ext is not None


def why_unavailable() -> str:
    return '' if _ext is not None else (_UNAVAILABLE or 'disabled')


# The kernel as two torch.library operators (forward, backward), with
# their autograd and their output shapes registered: torch.compile keeps
# them in its graphs, where an autograd.Function calling the extension
# would be opaque to dynamo and a compiled model would run the reference
# (SeTformer-T compiled by inductor, 8 x 224^2, AMD EPYC: inference 0.92 s
# with the kernel, 1.69 s with the reference; a training step 2.76 against
# 5.00 s: results/benchmark_compile.md).
# The forward returns y (B, h, n, d; heads_last) and what the backward
# needs: per slice (S = B*h), A, Uv (T+1, n), Bv (T+1, m), Sv (max(T, 1),
# m), z (m, d), s4 (m), w (n) and the scalings' maxima (2).
@torch.library.custom_op('mmsetformer::set_cpu_forward', mutates_args=(),
                         device_types='cpu')
def _forward(q: Tensor, tok: Tensor, rf3: Tensor, v: Tensor, eps: float,
             num_iters: int, stream_bytes: int,
             share_bytes: int) -> List[Tensor]:
    shapes = _shapes(q, rf3, num_iters, stream_bytes, share_bytes)
    ws = _scratch(_ext.forward_workspace(*shapes), q.dtype)
    return _ext.forward(q, tok, rf3, v, eps, NORM_DELTA, num_iters,
                        stream_bytes, share_bytes, ws)


@_forward.register_fake
def _(q, tok, rf3, v, eps, num_iters, stream_bytes, share_bytes):
    (B, h, n, d), m, T = q.shape, rf3.shape[1], num_iters
    return [heads_last(q.new_empty(B, h, n, d))] + [
        q.new_empty(B * h, *s) for s in (
            (T + 1, n), (T + 1, n), (T + 1, m), (max(T, 1), m), (m, d),
            (m, ), (n, ), (2, ))]


@torch.library.custom_op('mmsetformer::set_cpu_backward', mutates_args=(),
                         device_types='cpu')
def _backward(q: Tensor, tok: Tensor, rf3: Tensor, v: Tensor,
              fwd: List[Tensor], gy: Tensor, need_q: bool, need_r: bool,
              eps: float, stream_bytes: int,
              share_bytes: int) -> List[Tensor]:
    """[gq (S, n, d), grf (S, m, dp) per slice, gv (S, n, d)]; an empty
    tensor for a gradient not needed."""
    shapes = _shapes(q, rf3, fwd[1].shape[1] - 1, stream_bytes, share_bytes)
    ws = _scratch(_ext.backward_workspace(*shapes), q.dtype)
    grads = _ext.backward(q, tok, rf3, v, fwd[0], gy, *fwd[1:], need_q,
                          need_r, eps, NORM_DELTA, stream_bytes,
                          share_bytes, ws)
    return [q.new_empty(0) if g is None else g for g in grads]


def _shapes(q: Tensor, rf3: Tensor, num_iters: int, stream_bytes: int,
            share_bytes: int) -> tuple:
    """The workspace functions' arguments."""
    return (q.shape[0] * q.shape[1], q.shape[2], *rf3.shape[1:], q.shape[3],
            num_iters, stream_bytes, share_bytes, q.element_size())


# (q (B,h,n,d), tok (n, k), rf (1,h,m,d+k), v (B,h,n,d), eps, T) -> y
# (B,h,n,d), CPU, fp32 or fp64: the reference ``_SeTFunction`` on the
# features ``qf = [q / (|q| + NORM_DELTA) / eps, tok]`` (as ``_features``),
# which the kernel builds itself; q and v are read where the layer's
# projection put them, no copy made.
IMPLEMENTATION = FusedImplementation(
    'cpu', _forward, _backward, lambda: (STREAM_BYTES, SHARE_BYTES))
