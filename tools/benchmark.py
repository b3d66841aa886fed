"""Speed and memory of SeT / SeTformer against softmax attention and Swin,
measured in one process, one run, candidates interleaved; medians and
ratios from the same run.

    python tools/benchmark.py             # everything (< 10 min, 2 CPU cores)
    python tools/benchmark.py --quick     # small sizes, 1 repeat (smoke test)
    python tools/benchmark.py --only operator sinkhorn
    python tools/benchmark.py --device cuda     # the same on a GPU

Parts: ``operator`` (SeT vs global softmax SDPA vs Swin-style 7x7 window
attention over n tokens, forward and forward+backward), ``backbone``
(SeTformer-M/T/S vs Swin-T/S at 224^2 x 8 and 800x1344 x 1, inference and
one training step), ``model`` (Mask R-CNN and UperNet, SeTformer-T vs
Swin-T, inference FPS at the configs' test sizes) and ``sinkhorn`` (T = 0-10
against the column-marginal error and time). Writes ``benchmark.md``,
``benchmark.json`` and ``benchmark_scaling.png`` to ``--out``
(``benchmark_cuda.*`` on a GPU, where the operator also runs flash
attention in bf16 and n up to 200704, the backbones run at 224² x 64 and
800x1344 x 2 in fp32 and fp16 AMP, and the Sinkhorn part is left out).
``SeT`` is the operator as users get it (``auto``: the CPU's kernel; on
CUDA the faster of the reference and the Triton kernels, measured on each
size class's first call, listed at the end); ``SeT (reference)`` and
``SeTformer-T (reference SeT)`` run the reference in the same run, for the
speed-up, and on CUDA ``SeT (triton...)`` and ``SeTformer-T (Triton
SeT...)`` the fused kernels, at each ``tl.dot`` input precision, and
``SeT (triton, streamed)`` rebuilding K's tiles in every pass.  Peak
memory on the CPU is read from the allocator's events through torch's
profiler (kept out of the timed runs); on CUDA it is the allocator peak.
"""
import argparse
import ctypes
import ctypes.util
import functools
import gc
import importlib
import json
import math
import os
import os.path as osp
import platform
import re
import statistics
import sys
import time
import traceback
from typing import Callable, Dict
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import mmsetformer  # noqa: E402,F401
from mmsetformer.ops import (fused_cpu, fused_triton,  # noqa: E402
                             grid_positions, measured_choices, reference_grid,
                             set_attention, set_backend, transport_plan)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


# -- measurement --------------------------------------------------------------
def keep_freed_memory() -> str:
    """Make glibc keep freed blocks of up to 32 MiB for reuse; returns how
    the process allocates, for the report.

    By default glibc hands a freed block above its mmap threshold back to
    the system, and the next tensor of that size faults its pages in again
    (measured on this project's VMs: ~1.7 us per 4 KiB page, so ~0.4 ms
    per MB of every fresh activation).  PyTorch's CPU allocator does not
    cache, so that cost lands on whichever model allocates the most fresh
    memory per op (Swin-T at 800 x 1344 went from 1.5-1.9 s to 1.1-1.2 s
    with this setting; SeTformer-T, whose SeT keeps its scratch buffer,
    moved by <= 5 %).  The benchmark compares implementations, so every
    candidate runs with this setting (``--malloc system`` to measure
    without it)."""
    name = ctypes.util.find_library('c')
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return 'system allocator (no glibc mallopt here)'
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if mallopt(m_mmap_threshold, 32 << 20) and \
            mallopt(m_trim_threshold, (1 << 31) - 1):
        return 'glibc malloc keeps freed blocks <= 32 MiB (mallopt)'
    return 'system allocator (mallopt refused)'


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable, device, external=()) -> int:
    """Peak bytes allocated while ``fn`` runs, plus the bytes of the tensors
    in ``external`` (inputs, parameters) that existed before.

    On the CPU the allocator's events are read through torch's profiler, so
    buffers allocated inside compiled kernels count like any tensor, and
    the fused SeT's kept scratch buffer is freed first so that it does too;
    on CUDA it is the allocator's peak."""
    gc.collect()
    held = sum(t.numel() * t.element_size() for t in external)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base + held
    from torch.profiler import ProfilerActivity, profile
    fused_cpu.empty_cache()  # so that its scratch buffer counts in the peak
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    events = sorted((e.start_ns(), e.nbytes())
                    for e in p.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() ==
                    torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak + held


class Interleaved:
    """Times several candidates round-robin (so machine noise hits all of
    them alike) and keeps the median of each."""

    def __init__(self, device, repeats: int, warmup: int = 1,
                 budget_s: float = None):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.budget_s = budget_s

    def _timed(self, fn: Callable) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - t0

    def run(self, candidates: Dict[str, Callable]) -> Dict[str, float]:
        last = {}  # each candidate's last warm-up (the first may compile)
        for k, fn in candidates.items():
            for _ in range(self.warmup):
                last[k] = self._timed(fn)
        repeats = self.repeats
        if self.budget_s and last:  # fewer rounds where a round is slow
            repeats = max(1, min(repeats, int(
                self.budget_s / max(sum(last.values()), 1e-9))))
        times = {k: [] for k in candidates}
        for _ in range(repeats):
            for k, fn in candidates.items():
                times[k].append(self._timed(fn))
        return {k: statistics.median(v) for k, v in times.items()}


# -- part 1: operator scaling -------------------------------------------------
def window_attention(q, k, v, hw, window=7):
    """Swin-style attention inside non-overlapping 7x7 windows (padded)."""
    B, h, n, d = q.shape
    H, W = hw
    ph, pw = -H % window, -W % window

    def part(x):
        x = x.transpose(2, 3).reshape(B, h * d, H, W)
        x = F.pad(x, (0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        x = x.view(B, h, d, Hp // window, window, Wp // window, window)
        return x.permute(0, 3, 5, 1, 4, 6, 2).reshape(-1, h, window**2, d)

    out = F.scaled_dot_product_attention(part(q), part(k), part(v))
    Hp, Wp = H + ph, W + pw
    out = out.view(B, Hp // window, Wp // window, h, window, window, d)
    out = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(B, h, Hp, Wp, d)
    return out[:, :, :H, :W].reshape(B, h, n, d)


def bench_operator(args, device, report):
    cuda = device.type == 'cuda'
    sides = [16, 32, 56] if args.quick else [56, 112, 224, 448] if cuda \
        else [56, 112, 224]
    m, heads, d = (64, 2, 32) if args.quick else (750, 2, 32)
    eps, sigma, T = 0.3, 0.8, 3
    kw = dict(eps=eps, num_iters=T, sigma=sigma)
    # (filled as it goes: a checkpoint's report keeps what was measured)
    rows = []
    op = report['operator'] = dict(m=m, heads=heads, head_dim=d, eps=eps,
                                   sigma=sigma, num_iters=T, rows=rows)
    grid = reference_grid(m)
    ref_pos = grid_positions(*grid, device=device)
    for side in sides:
        n = side * side
        hw = (side, side)
        q, k, v, refs = _operator_inputs(1, heads, n, m, d, device)
        pos = (grid_positions(*hw, device=device), ref_pos)
        leaves = (q, k, v, refs)

        set_op = functools.partial(set_attention, q, v, refs, pos=pos, **kw)
        fns = {
            'SeT': set_op,
            'SeT (reference)': _forced(set_op, 'reference'),
            'softmax (SDPA)': lambda: F.scaled_dot_product_attention(q, k, v),
            'window 7x7': lambda: window_attention(q, k, v, hw),
        }
        if not cuda and fused_cpu.available():
            def set_streamed():
                # the CPU kernel rebuilding every pass's blocks (O(n)
                # memory), as it does by default only for huge kernels
                with fused_cpu.stream_above(0):
                    return set_op()
            fns['SeT (streamed)'] = set_streamed
        if cuda:
            def set_kept():
                # the reference keeping K for its backward instead of
                # rebuilding it there (the default on GPUs: KEEP_KERNEL)
                with set_backend('reference'), mock.patch.object(
                        importlib.import_module(
                            'mmsetformer.ops.set_attention'),
                        'KEEP_KERNEL', '1'):
                    return set_op()
            fns['SeT (reference, K kept)'] = set_kept
            # the Triton kernels at each tl.dot input precision: the TF32
            # ones only become a default once their error (below) is known
            # (3xTF32's, as accurate as fp32 when emulated, at every n)
            for prec in ('ieee', 'tf32x3', 'tf32')[:2 if n > 50176 else 3]:
                fns['SeT (triton)' if prec == 'ieee' else
                    f'SeT (triton, {prec})'] = _forced(set_op, 'triton', prec)
            if n <= 50176:
                def triton_streamed():
                    # rebuilding K's tiles in every pass (O(n + m) memory),
                    # as they do by default only above STREAM_BYTES
                    with fused_triton.stream_above(0):
                        return _forced(set_op, 'triton', 'ieee')()
                fns['SeT (triton, streamed)'] = triton_streamed
            # flash attention takes half inputs: bf16 copies as own leaves
            qb, kb, vb = (t.bfloat16() for t in (q, k, v))
            leaves += (qb, kb, vb)

            def flash():
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qb, kb, vb)
            fns['softmax (SDPA flash, bf16)'] = flash
        if side == sides[0]:
            with torch.no_grad(), set_backend('reference'):
                y64 = set_attention(q.double(), v.double(), refs.double(),
                                    pos=pos, **kw)
            op['accuracy'] = _accuracy({k: f for k, f in fns.items()
                                        if k.startswith('SeT')}, y64)
        big_sdpa = n > 20000 and device.type == 'cpu'
        for mode in ('forward', 'forward+backward'):
            cands = {name: _operator_call(fn, leaves, mode != 'forward')
                     for name, fn in fns.items()}
            times = {}
            if big_sdpa:  # seconds a call here: one cold call is enough
                times = Interleaved(device, 1, warmup=0).run(
                    {'softmax (SDPA)': cands['softmax (SDPA)']})
            # milliseconds on a shared machine: many repeats for a stable
            # median where each costs little; after a warm-up call, as in
            # a training loop (the CPU kernel keeps its scratch buffer)
            reps = 1 if args.quick else _repeats(args, device) \
                if n > 20000 else max(10, _repeats(args, device))
            times.update(Interleaved(device, reps).run(
                {k: fn for k, fn in cands.items() if k not in times}))
            for name, fn in cands.items():
                mem = peak_memory(fn, device, (q, k, v, refs))
                rows.append(dict(n=n, op=name, mode=mode, time=times[name],
                                 peak_mem=mem))
                print(f'  operator n={n:6d} {mode:17s} {name:26s} '
                      f'{times[name] * 1e3:9.2f} ms {mem / 2**20:9.1f} MiB',
                      flush=True)
            checkpoint()
    if cuda and not args.quick:
        report['operator']['batched'] = _batched_tokens(
            args, device, sides[:3], kw, m, heads, d)
    # where the time of SeT's forward + backward goes, at the largest n up
    # to 50176 (the next GPU session reads its kernels' shares here)
    side = max(s for s in sides if s * s <= 50176)
    q, _, v, refs = _operator_inputs(1, heads, side * side, m, d, device)
    pos = (grid_positions(side, side, device=device), ref_pos)

    set_op = functools.partial(set_attention, q, v, refs, pos=pos, **kw)
    impls = {'SeT': set_op,
             'SeT (reference)': _forced(set_op, 'reference')}
    if cuda:
        impls['SeT (triton)'] = _forced(set_op, 'triton')
        impls['SeT (triton, tf32x3)'] = _forced(set_op, 'triton', 'tf32x3')
    report['operator']['kernels'] = dict(
        n=side * side, what='CUDA kernel' if cuda else 'operator', rows=[
            dict(impl=k, **r) for k, fn in impls.items()
            for r in kernel_times(_operator_call(fn, (q, v, refs), True),
                                  device)['kernels']])


def checkpoint():
    """Rewrite the report so far (set by :func:`main`): a run stopped
    inside a part (a GPU lease's time limit) keeps the rows it measured."""


def _forced(fn: Callable, backend: str, precision: str = None) -> Callable:
    """``fn`` with SeT forced to ``backend`` (and, for the Triton kernels,
    ``tl.dot``'s input precision) while it runs."""
    env = {} if precision is None else dict(
        MMSETFORMER_SET_PRECISION=precision)

    def call(*args):
        with set_backend(backend), mock.patch.dict(os.environ, env):
            return fn(*args)
    return call


def kernel_times(call: Callable, device, top: int = 10) -> dict:
    """Where one ``call`` spends its time, from torch's profiler after a
    warm-up call: ``kernels``, the CUDA kernels (on the CPU: operators) by
    their own time, and on CUDA ``ops``, the operators by the time of the
    kernels each launched itself; the ``top`` ones and the rest as one
    row, each with its calls, ms and share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    call()
    _sync(device)
    cuda = device.type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if cuda else [])) as p:
        call()
        _sync(device)
    # (a custom operator with autograd runs inside an autograd.Function
    # torch generates, whose profiler label is "GeneratedBackwardFor_<ns>_
    # <op>_default": the operator's forward, named as the operator)
    events = {'kernels': [], 'ops': []}
    for e in p.key_averages():
        kind = 'ops' if cuda and e.device_type == DeviceType.CPU \
            else 'kernels'
        events[kind].append(dict(
            kernel=re.sub(r'^GeneratedBackwardFor_([a-z0-9]+)_(\w+)'
                          r'_default$', r'\1::\2', e.key),
            calls=e.count, ms=(e.self_device_time_total if cuda
                               else e.self_cpu_time_total) / 1e3))
    out = {}
    for kind, rows in events.items():
        rows = sorted((r for r in rows if r['ms'] > 0),
                      key=lambda r: -r['ms'])
        total = sum(r['ms'] for r in rows)
        out[kind] = _fold([dict(r, share=r['ms'] / total) for r in rows],
                          top)
    return out if cuda else {'kernels': out['kernels']}


def _fold(rows: list, top: int, rest: str = '({} others)') -> list:
    """Ranked ``rows``: the ``top`` ones and the rest summed in one row."""
    if len(rows) <= top + 1:
        return rows
    return rows[:top] + [dict(kernel=rest.format(len(rows) - top), **{
        k: sum(r[k] for r in rows[top:]) for k in ('calls', 'ms', 'share')})]


def _batched_tokens(args, device, sides, kw, m, heads, d):
    """SeT over B images of n tokens with B*n fixed: a GPU is busy only when
    there is enough work, so this, not one image per size, shows whether
    the cost per token stays constant as n grows."""
    total = sides[-1] ** 2
    rows = []
    ref_pos = grid_positions(*reference_grid(m), device=device)
    for side in sides:
        n = side * side
        B = total // n
        q, _, v, refs = _operator_inputs(B, heads, n, m, d, device)
        pos = (grid_positions(side, side, device=device), ref_pos)
        for mode in ('forward', 'forward+backward'):
            call = _operator_call(
                lambda: set_attention(q, v, refs, pos=pos, **kw),
                (q, v, refs), mode != 'forward')
            t = Interleaved(device, _repeats(args, device)).run(
                {'SeT': call})['SeT']
            rows.append(dict(n=n, batch=B, mode=mode, time=t))
            print(f'  operator {B:2d} x n={n:6d} {mode:17s} SeT '
                  f'{t * 1e3:9.2f} ms', flush=True)
    return rows


def _accuracy(fns, y64):
    """Each candidate's forward error against ``y64``, the reference in
    float64 on the same device: max |y - y64| / max |y64|."""
    with torch.no_grad():
        return {k: ((f().double() - y64).abs().max() / y64.abs().max()).item()
                for k, f in fns.items()}


def _operator_inputs(B, heads, n, m, d, device):
    """Seeded q, k, v (B, heads, n, d) and references (heads, m, d)."""
    g = torch.Generator(device='cpu').manual_seed(0)
    q, k, v = (torch.randn(B, heads, n, d, generator=g).to(device)
               for _ in range(3))
    return q, k, v, torch.randn(heads, m, d, generator=g).to(device)


def _operator_call(fn, leaves, train: bool):
    """``fn`` under no_grad, or forward + backward of a scalar of its output
    with fresh gradients for ``leaves``."""
    def call():
        if not train:
            with torch.no_grad():
                return fn()
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        fn().float().square().mean().backward()
        for t in leaves:
            t.requires_grad_(False)
    return call


def _repeats(args, device):
    # GPU kernels take milliseconds: more repeats for a stable median
    return max(args.repeats, 10) if device.type == 'cuda' else args.repeats


# -- part 2: backbones --------------------------------------------------------
SWIN_TIMM = {(2, 2, 6, 2): 'swin_tiny_patch4_window7_224',
             (2, 2, 18, 2): 'swin_small_patch4_window7_224'}


def swin_source(choice: str = 'auto') -> str:
    """Where the Swin baselines come from: 'mmdet' (its SwinTransformer, the
    backbone of the configs SeTformer replaces) or 'timm' (the same
    architecture, for an environment without mmdet, e.g. a GPU machine
    still building mmcv's ops); 'auto': mmdet where it imports."""
    if choice != 'auto':
        return choice
    try:
        from mmdet.models.backbones import SwinTransformer  # noqa: F401
    except Exception:  # not installed, or mmcv without its compiled ops
        return 'timm'
    return 'mmdet'


def _swin(depths, heads_, embed=96, source='mmdet', hw=(224, 224)):
    if source == 'timm':
        import timm
        return timm.create_model(SWIN_TIMM[tuple(depths)], pretrained=False,
                                 features_only=True, img_size=tuple(hw),
                                 drop_path_rate=0.)
    from mmdet.models.backbones import SwinTransformer
    return SwinTransformer(embed_dims=embed, depths=depths,
                           num_heads=heads_, window_size=7,
                           drop_path_rate=0.)


def _setformer(arch, m):
    from mmsetformer.models import SeTformer
    return SeTformer(arch, num_refs=m, drop_path_rate=0.)


class _SeTBackend(torch.nn.Module):
    """A backbone whose SeT layers run the given implementation (and, for
    the Triton kernels, ``tl.dot`` input precision; ``streamed``: their
    kernels rebuilt in every pass at every size)."""

    def __init__(self, backbone, backend: str, precision: str = None,
                 streamed: bool = False):
        super().__init__()
        self.backbone, self.streamed = backbone, streamed
        self.run = _forced(backbone, backend, precision)

    def forward(self, x):
        if not self.streamed:
            return self.run(x)
        with fused_triton.stream_above(0):
            return self.run(x)


def backbones(quick, swin='mmdet', cuda=False):
    """{name: make(m, (h, w))}: SeTformer with m references, Swin (from
    ``swin``, see :func:`swin_source`) built for h x w inputs.  SeTformer-T
    also with its SeT forced to the reference (against the compiled
    kernel on the CPU, against the measured choice on CUDA) and, on CUDA,
    to the Triton kernels in fp32 and in 3xTF32."""
    def sw(depths):
        return lambda m, hw: _swin(depths, (3, 6, 12, 24), source=swin,
                                   hw=hw)

    def forced(arch, *how):
        return lambda m, hw: _SeTBackend(_setformer(arch, m), *how)
    if quick:
        return {'SeTformer-M': lambda m, hw: _setformer('m', m),
                'SeTformer-M (reference SeT)': forced('m', 'reference'),
                'Swin-T': sw((2, 2, 6, 2))}
    variants = {'SeTformer-T (reference SeT)': forced('t', 'reference')}
    if cuda:
        variants.update({
            'SeTformer-T (Triton SeT)': forced('t', 'triton'),
            'SeTformer-T (Triton SeT, 3xTF32)': forced('t', 'triton',
                                                       'tf32x3'),
            # O(n + m) memory in every layer: what the memory target costs
            'SeTformer-T (Triton SeT, streamed)': forced('t', 'triton', None,
                                                         True)})
    return {
        'SeTformer-M': lambda m, hw: _setformer('m', m),
        'SeTformer-T': lambda m, hw: _setformer('t', m),
        **variants,
        'SeTformer-S': lambda m, hw: _setformer('s', m),
        'Swin-T': sw((2, 2, 6, 2)),
        'Swin-S': sw((2, 2, 18, 2)),
    }


def _wanted(name: str, models) -> bool:
    """Whether ``--models`` asks for backbone ``name``: Swin-T always; a
    model by its name (with its variants unless some are named alone)."""
    base = name.split(' (')[0]
    alone = [a for a in models or () if a.startswith(base + ' (')]
    return not models or name in models or base == 'Swin-T' or (
        base in models and not alone)


def _inference(mod, x, amp=None, run=None) -> Callable:
    """One batch through ``run`` (default: the module ``mod`` itself, or
    e.g. its compiled wrapper) in eval mode, without autograd; ``amp``:
    the autocast dtype, if any."""
    run = mod if run is None else run

    def call():
        mod.eval()
        with torch.no_grad(), torch.autocast(
                x.device.type, dtype=amp or torch.float32,
                enabled=amp is not None):
            run(x)
    return call


def _train_step(mod, x, amp=None, run=None) -> Callable:
    """One AdamW step of ``mod`` on the mean of ``run``'s outputs (as
    :func:`_inference`), with a gradient scaler under ``amp``."""
    run = mod if run is None else run
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp is not None)

    def call():
        mod.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp or torch.float32,
                            enabled=amp is not None):
            loss = sum(o.float().mean() for o in run(x))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return call


def bench_backbone(args, device, report):
    from mmsetformer.analysis import complexity

    # (label, input, m, models): every variant at 224^2; the targets'
    # pair (T vs Swin-T) at detection size, to stay within the time budget
    settings = [('224x224, batch 8', (8, 224, 224), 500, None),
                ('800x1344, batch 1', (1, 800, 1344), 750,
                 ('SeTformer-T', 'SeTformer-T (reference SeT)', 'Swin-T'))]
    if device.type == 'cuda':  # the GPU sizes, every model
        settings = [('224x224, batch 64', (64, 224, 224), 500, None),
                    ('800x1344, batch 2', (2, 800, 1344), 750, None)]
    if args.quick:
        settings = [('64x64, batch 2', (2, 64, 64), 64, None),
                    ('128x192, batch 1', (1, 128, 192), 64, None)]
    # on a GPU also in mixed precision (fp16 autocast), as users train
    precisions = [None, torch.float16] if device.type == 'cuda' else [None]
    swin = swin_source(args.swin)
    print(f'  Swin baselines from {swin}', flush=True)
    # (filled as it goes: the report written after a failure keeps them)
    rows = report['backbone'] = []
    report['swin'] = swin
    settings = [s for s in settings if not args.settings or
                any(s[0].startswith(a) for a in args.settings)]
    for label, (b, h, w), m, only in settings:
        models = {k: f(m, (h, w)).to(device)
                  for k, f in backbones(args.quick, swin,
                                        device.type == 'cuda').items()
                  if (only is None or k in only) and
                  _wanted(k, args.models)}
        x = torch.randn(b, 3, h, w, device=device)
        cplx = {k: complexity(mod, (x[:1], )) for k, mod in models.items()}

        for (mode, make), amp in [(mk, amp) for mk in (
                ('inference', _inference), ('train step', _train_step))
                for amp in precisions]:
            # one training step at detection size on the CPU takes ~30 s
            # for the three models: one timed step each, after two warm-up
            # steps (Swin-T's second step there took 4.2-8.2 s, later ones
            # steadier)
            slow = h > 512 and device.type == 'cpu' and make is _train_step
            reps = 1 if args.quick or slow else _repeats(args, device)
            if amp is not None:
                mode += ', AMP fp16'
            cands = {k: make(mod, x, amp) for k, mod in models.items()}
            # a GPU lease is short: at most ~30 s of timed rounds a mode,
            # judged from a second warm-up call (the first compiles)
            cuda = device.type == 'cuda'
            times = Interleaved(device, reps, warmup=2 if slow or cuda
                                else 1, budget_s=30 if cuda else None).run(
                                    cands)
            for k, fn in cands.items():
                mem = peak_memory(fn, device, (x, ) + tuple(
                    models[k].parameters()))
                rows.append(dict(setting=label, model=k, mode=mode,
                                 batch=b, time=times[k], peak_mem=mem,
                                 params=cplx[k]['params'],
                                 flops=cplx[k]['flops'],
                                 num_refs=m if 'SeT' in k else None))
                if cuda:
                    # the GPU's kernels' time over the step's: well below
                    # 1, the step waits for the CPU to issue its launches
                    rows[-1].update(kernel_times(fn, device, 30))
                    rows[-1]['busy'] = sum(
                        r['ms'] for r in rows[-1]['kernels']) / 1e3 / times[k]
                print(f'  backbone {label:18s} {mode:21s} {k:27s} '
                      f'{times[k]:7.3f} s {b / times[k]:8.1f} img/s '
                      f'{mem / 2**20:8.0f} MiB '
                      f'{cplx[k]["flops"] / 1e9:7.1f} GFLOPs' + (
                          f' GPU busy {rows[-1]["busy"]:.0%}' if cuda
                          else ''), flush=True)
            checkpoint()
        del models
        gc.collect()


# -- opt-in part (--only compile): torch.compile ------------------------------
def bench_compile(args, device, report):
    """SeTformer-T eager and under torch.compile (inductor), with the fused
    SeT kernels kept in the compiled graph (what users get: on CUDA, what
    ``auto`` measures while dynamo traces) and with the reference SeT
    compiled instead (what a compiled SeTformer ran before the kernels
    were operators; on CUDA also the Triton kernels forced), against eager
    Swin-T in the same run.
    Compiling takes minutes on a 2-core CPU, so this part is opt-in; the
    first call of each candidate (compilation included) is reported."""
    cuda = device.type == 'cuda'
    b, size, m = (2, 64, 64) if args.quick else (64 if cuda else 8, 224, 500)
    x = torch.randn(b, 3, size, size, device=device)
    makers = backbones(False, swin_source(args.swin))
    # (label, backbone, compiled, SeT backend while tracing)
    cands = [('Swin-T', 'Swin-T', False, 'auto'),
             ('SeTformer-T', 'SeTformer-T', False, 'auto'),
             ('SeTformer-T compiled', 'SeTformer-T', True, 'auto'),
             ('SeTformer-T compiled (reference SeT)', 'SeTformer-T', True,
              'reference')]
    if cuda:  # auto measures these two while dynamo traces; both, forced
        cands.append(('SeTformer-T compiled (Triton SeT)', 'SeTformer-T',
                      True, 'triton'))
    rows = []
    for mode, make in (('inference', _inference),
                       ('train step', _train_step)):
        calls, first = {}, {}
        for label, name, compiled, backend in cands:
            torch.manual_seed(0)
            mod = makers[name](m, (size, size)).to(device)
            torch._dynamo.reset()
            run = torch.compile(mod) if compiled else None
            calls[label] = _forced(make(mod, x, run=run), backend)
            t0 = time.perf_counter()
            calls[label]()  # (compiles)
            _sync(device)
            first[label] = time.perf_counter() - t0
            print(f'  compile {mode:10s} {label:37s} first call '
                  f'{first[label]:6.1f} s', flush=True)
        times = Interleaved(device, 1 if args.quick else _repeats(
            args, device)).run(calls)
        for label in calls:
            rows.append(dict(setting=f'{size}x{size}, batch {b}', mode=mode,
                             model=label, time=times[label],
                             first_call=first[label]))
            print(f'  compile {mode:10s} {label:37s} {times[label]:7.3f} s',
                  flush=True)
    report['compile'] = rows


# -- part 3: whole models -----------------------------------------------------
MODELS = {
    'Mask R-CNN': ('mmdet', 'mask_rcnn_setformer_t_3x.py',
                   'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
                   (800, 1344)),
    'UperNet': ('mmseg', 'upernet_setformer_t_160k.py',
                'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_'
                '8xb2-160k_ade20k-512x512.py', (512, 683)),
}


def _build_from(base: str):
    from mmengine.config import Config

    from mmsetformer.apis import build_model
    if base.startswith(('mmdet::', 'mmseg::')):
        path = osp.join(ROOT, 'results', '.bench_cfg.py')
        os.makedirs(osp.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(f'_base_ = [{base!r}]\n')
        cfg = Config.fromfile(path)
    else:
        cfg = Config.fromfile(osp.join(ROOT, 'configs', base))
    cfg.model.backbone.pop('init_cfg', None)
    cfg.model.pop('pretrained', None)
    if 'SyncBN' in str(cfg.model):
        from mmengine.model import revert_sync_batchnorm
        return revert_sync_batchnorm(build_model(cfg))
    return build_model(cfg)


def _samples(scope, shape, batch):
    h, w = shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1., 1.))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta) for _ in range(batch)]
    from mmseg.structures import SegDataSample
    return [SegDataSample(metainfo=dict(meta, padding_size=[0, 0, 0, 0]))
            for _ in range(batch)]


def bench_model(args, device, report):
    rows = []
    for name, (scope, ours, swin, shape) in MODELS.items():
        if args.quick:
            shape = (256, 320)
        built = {'SeTformer-T': _build_from(ours).to(device).eval(),
                 'Swin-T': _build_from(swin).to(device).eval()}
        x = torch.randn(1, 3, *shape, device=device)
        samples = _samples(scope, shape, 1)

        def predict(mod):
            def call():
                with torch.no_grad():
                    mod(x, samples, mode='predict')
            return call

        times = Interleaved(
            device, 1 if args.quick else _repeats(args, device)).run(
                {k: predict(mod) for k, mod in built.items()})
        for k, t in times.items():
            params = sum(p.numel() for p in built[k].parameters())
            rows.append(dict(model=name, backbone=k, shape=list(shape),
                             time=t, fps=1 / t, params=params))
            print(f'  model {name:10s} {k:12s} {shape} {1 / t:6.2f} img/s',
                  flush=True)
        del built
        gc.collect()
    report['model'] = rows


# -- part 4: Sinkhorn iterations ----------------------------------------------
def bench_sinkhorn(args, device, report):
    side, m, d, heads = (24, 64, 16, 2) if args.quick else (56, 750, 32, 2)
    n = side * side
    g = torch.Generator().manual_seed(0)
    # clustered queries, like real features (random ones give a trivially
    # flat kernel): 40 directions, each token near one of them
    centres = F.normalize(torch.randn(heads, 40, d, generator=g), dim=-1)
    which = torch.randint(0, 40, (heads, n), generator=g)
    q = centres.gather(1, which[..., None].expand(-1, -1, d))
    q = (q + 0.3 * torch.randn(heads, n, d, generator=g))[None].to(device)
    v = torch.randn(1, heads, n, d, generator=g).to(device)
    refs = torch.randn(heads, m, d, generator=g).to(device)
    pos = (grid_positions(side, side, device=device),
           grid_positions(*reference_grid(m), device=device))
    kw = dict(eps=0.3, pos=pos, sigma=0.8)
    y_ref = set_attention(q, v, refs, num_iters=100, **kw)
    iters = range(0, 11)
    cands = {}
    for T in iters:
        cands[T] = (lambda T=T: set_attention(q, v, refs, num_iters=T, **kw))
    with torch.no_grad():
        times = Interleaved(device, 1 if args.quick else args.repeats).run(
            cands)
    rows = []
    for T in iters:
        P = transport_plan(q, refs, num_iters=T, **kw)
        col = (P.sum(-2) * m - 1).abs().mean().item()  # relative to 1/m
        y = set_attention(q, v, refs, num_iters=T, **kw)
        dev = ((y - y_ref).norm() / y_ref.norm()).item()
        rows.append(dict(T=T, col_err=col, out_dev=dev, time=times[T]))
        print(f'  sinkhorn T={T:2d} column error {col:8.4f} output vs T=100 '
              f'{dev:8.4f} {times[T] * 1e3:8.1f} ms', flush=True)
    report['sinkhorn'] = dict(n=n, m=m, head_dim=d, heads=heads, rows=rows,
                              trained=_trained_plan_errors(args, device))


def _trained_plan_errors(args, device):
    """Column error / output deviation per T on the features of a trained
    model (the demo's, if it was run): real features converge slower than
    any synthetic stand-in."""
    if not args.plan_checkpoint or not osp.isfile(args.plan_checkpoint):
        return None
    import glob

    import cv2

    from mmsetformer.apis import init_model
    from mmsetformer.visualization import find_backbone, image_tensor
    model = init_model(args.plan_config, args.plan_checkpoint, device=device)
    backbone = find_backbone(model)
    data_root = model.cfg.get('data_root', 'data/shapes/')
    paths = sorted(glob.glob(osp.join(ROOT, data_root, 'images',
                                      'validation', '*.jpg')))[:4]
    if not paths:
        return None
    x = torch.cat([image_tensor(cv2.imread(p),
                                model.cfg.model.data_preprocessor)
                   for p in paths]).to(device)
    captured = []
    hooks = [blk.attn.register_forward_pre_hook(
        lambda mod, a: captured.append((mod, a[0], tuple(a[1]))))
        for st in backbone.stages for blk in st.blocks]
    with torch.no_grad():
        backbone(x)
        for h in hooks:
            h.remove()
        per_t = {T: [] for T in (0, 1, 2, 3, 5, 10)}
        for attn, tokens, hw in captured:
            q, v = attn._split(tokens, hw)
            kw = dict(eps=attn.eps, pos=attn._pos(hw), sigma=attn.sigma)
            ref = set_attention(q, v, attn.refs, num_iters=100, **kw)
            for T in per_t:
                P = transport_plan(q, attn.refs, num_iters=T, **kw)
                col = (P.sum(-2) * attn.num_refs - 1).abs().mean().item()
                y = set_attention(q, v, attn.refs, num_iters=T, **kw)
                per_t[T].append((col, ((y - ref).norm() / ref.norm()).item()))
    rows = [dict(T=T, col_err=max(c for c, _ in vals),
                 out_dev=max(d for _, d in vals)) for T, vals in per_t.items()]
    for r in rows:
        print(f'  sinkhorn (trained demo model, worst layer) T={r["T"]:2d} '
              f'column error {r["col_err"]:.4f} output vs T=100 '
              f'{r["out_dev"]:.4f}', flush=True)
    return dict(config=osp.basename(args.plan_config), layers=len(captured),
                rows=rows)


# -- report -------------------------------------------------------------------
def _mib(b):
    return f'{b / 2**20:,.1f}'


def _dashes(row: str) -> str:
    """A markdown row with its cells not measured (nan) as dashes."""
    return re.sub(r'(?<=\| )nan×?(?= \|)', '—', row)


def to_markdown(report) -> str:
    out = [f'Machine: {report["machine"]}; {report["date"]}; '
           f'{report.get("allocator", "system allocator")}; '
           f'{"quick mode; " if report["quick"] else ""}'
           f'medians of interleaved runs.', '']
    if report.get('operator', {}).get('rows'):
        op = report['operator']
        names = list(dict.fromkeys(r['op'] for r in op['rows']))
        others = [k for k in names if k != 'SeT']
        out += [f'**Operator** (1 image, {op["heads"]} heads of '
                f'{op["head_dim"]}; SeT with m = {op["m"]}, ε = {op["eps"]}, '
                f'σ = {op["sigma"]}, T = {op["num_iters"]}; fp32 unless '
                'named):', '',
                '| n | mode | ' + ' | '.join(f'{k} ms' for k in names) +
                ' | ' + ' | '.join(f'{k} MiB' for k in names) + ' | ' +
                ' | '.join(f'{k} / SeT time' for k in others) + ' |',
                '| --- | --- |' + ' --- |' * (2 * len(names) + len(others))]
        by = {}
        for r in op['rows']:
            by.setdefault((r['n'], r['mode']), {})[r['op']] = r
        for (n, mode), d in by.items():
            s = d['SeT']
            # (a cell not measured at this n: a dash)
            na = dict(time=math.nan, peak_mem=math.nan)
            c = {k: d.get(k, na) for k in names}
            out.append(_dashes(
                f'| {n} | {mode} | ' +
                ' | '.join(f'{c[k]["time"] * 1e3:,.2f}' for k in names) +
                ' | ' + ' | '.join(_mib(c[k]['peak_mem']) for k in names) +
                ' | ' + ' | '.join(f'{c[k]["time"] / s["time"]:.1f}×'
                                   for k in others) + ' |'))
        ns = sorted({n for n, _ in by})
        if len(ns) >= 2:
            out += ['', 'SeT scaling from the smallest to the largest n '
                    f'(×{ns[-1] / ns[0]:.0f} tokens; linear = 1.00):', '',
                    '| implementation, mode | time ratio / linear | memory '
                    'ratio / linear |',
                    '| --- | --- | --- |']
            for name in [k for k in names if k.startswith('SeT')]:
                for mode in ('forward', 'forward+backward'):
                    if (ns[-1], mode) not in by:  # (a run still going)
                        continue
                    a, b = (by[(n, mode)].get(name) for n in (ns[0], ns[-1]))
                    if a is None or b is None:
                        continue
                    f = ns[-1] / ns[0]
                    out.append(f'| {name}, {mode} | '
                               f'{b["time"] / a["time"] / f:.2f} | '
                               f'{b["peak_mem"] / a["peak_mem"] / f:.2f} |')
        acc = op.get('accuracy')
        if acc:
            out += ['', f'SeT forward error at n = {ns[0]} against the '
                    'reference in float64 (max |y − y64| / max |y64|):', '',
                    '| implementation | error |', '| --- | --- |']
            out += [f'| {k} | {e:.1e} |' for k, e in acc.items()]
        batched = op.get('batched')
        if batched:
            total = batched[0]['n'] * batched[0]['batch']
            out += ['', f'SeT at a constant {total} tokens (B images of n '
                    'tokens, B·n fixed; equal times = linear in n):', '',
                    '| n | B | mode | ms | vs the largest n |',
                    '| --- | --- | --- | --- | --- |']
            last = {r['mode']: r for r in batched}
            for r in batched:
                out.append(f'| {r["n"]} | {r["batch"]} | {r["mode"]} | '
                           f'{r["time"] * 1e3:,.2f} | '
                           f'{r["time"] / last[r["mode"]]["time"]:.2f} |')
        kern = op.get('kernels')
        if kern:
            out += ['', 'Where SeT\'s forward + backward spends its time '
                    f'at n = {kern["n"]} (torch.profiler: the own time of '
                    f'each {kern["what"]}):', '',
                    '| implementation | kernel | calls | ms | share |',
                    '| --- | --- | --- | --- | --- |']
            out += [f'| {r["impl"]} | `{r["kernel"][:60]}` | {r["calls"]} | '
                    f'{r["ms"]:,.2f} | {r["share"]:.0%} |'
                    for r in kern['rows']]
        out.append('')
    if 'backbone' in report:
        swin = {'mmdet': "mmdet's SwinTransformer",
                'timm': "timm's swin_*_patch4_window7 (features_only)"}[
                    report.get('swin', 'mmdet')]
        busy = all('busy' in r for r in report['backbone'])
        out += ['**Backbones** (SeTformer at the paper\'s m for the task: '
                f'500 at 224², 750 at 800×1344; Swin: {swin}' + (
                    '; GPU busy: the time of its kernels (torch.profiler) '
                    'over the step\'s, well below 100 % where the step waits '
                    'for the CPU to launch them' if busy else '') + '):', '',
                '| setting | mode | model | time s | img/s | time vs Swin-T | '
                'peak MiB | memory vs Swin-T | params M | GFLOPs |' + (
                    ' GPU busy |' if busy else ''),
                '|' + ' --- |' * (10 + busy)]
        ref = {(r['setting'], r['mode']): r for r in report['backbone']
               if r['model'] == 'Swin-T'}
        for r in report['backbone']:
            # (no Swin-T row where a run stopped inside the mode)
            s = ref.get((r['setting'], r['mode']),
                        dict(time=math.nan, peak_mem=math.nan))
            out.append(
                f'| {r["setting"]} | {r["mode"]} | {r["model"]} | '
                f'{r["time"]:.3f} | {r.get("batch", 1) / r["time"]:.1f} | '
                f'{r["time"] / s["time"]:.2f} | '
                f'{_mib(r["peak_mem"])} | {r["peak_mem"] / s["peak_mem"]:.2f}'
                f' | {r["params"] / 1e6:.1f} | {r["flops"] / 1e9:.1f} |' + (
                    f' {r["busy"]:.0%} |' if busy else ''))
        out.append('')
        out += _kernel_shares(report['backbone'])
    if 'set_choices' in report:
        out += ["**What `auto` measured** (on CUDA, the first call of each "
                'size class runs the reference and the Triton kernels and '
                'keeps the faster; ms of one call):', '',
                '| B·h·n·m below | d | T | LPE | backward | tl.dot | '
                'reference ms | Triton ms | chosen |', '|' + ' --- |' * 9]
        for c in report['set_choices']:
            t = c['times']
            out.append(f'| 2^{c["bits"]} | {c["d"]} | {c["num_iters"]} | '
                       f'{"on" if c["lpe"] else "off"} | '
                       f'{"yes" if c["backward"] else "no"} | '
                       f'{c["precision"]} | {t["reference"] * 1e3:,.2f} | '
                       f'{t["triton"] * 1e3:,.2f} | {c["choice"]} |')
        out.append('')
    if 'model' in report:
        out += ['**Whole models**, inference (batch 1, predict mode with '
                'post-processing):', '',
                '| model | input | backbone | img/s | time ratio vs Swin-T | '
                'params M |', '| --- | --- | --- | --- | --- | --- |']
        ref = {r['model']: r for r in report['model']
               if r['backbone'] == 'Swin-T'}
        for r in report['model']:
            out.append(f'| {r["model"]} | {r["shape"][0]}×{r["shape"][1]} | '
                       f'{r["backbone"]} | {r["fps"]:.2f} | '
                       f'{r["time"] / ref[r["model"]]["time"]:.2f} | '
                       f'{r["params"] / 1e6:.1f} |')
        out.append('')
    if 'compile' in report:
        rows = report['compile']
        out += [f'**torch.compile** (inductor, {rows[0]["setting"]}; the '
                'first call includes compiling; SeT while compiling: the '
                'fused kernels, kept in the graph, or the reference):', '',
                '| mode | model | time s | time vs Swin-T (eager) | first '
                'call s |', '| --- | --- | --- | --- | --- |']
        swin = {r['mode']: r['time'] for r in rows if r['model'] == 'Swin-T'}
        for r in rows:
            out.append(f'| {r["mode"]} | {r["model"]} | {r["time"]:.3f} | '
                       f'{r["time"] / swin[r["mode"]]:.2f} | '
                       f'{r["first_call"]:.0f} |')
        out.append('')
    if 'sinkhorn' in report:
        sk = report['sinkhorn']
        out += [f'**Sinkhorn iterations** (n = {sk["n"]}, m = {sk["m"]}, '
                'clustered queries; column error = mean |m·colsum − 1|; '
                'output deviation from T = 100):', '',
                '| T | column error | output deviation | forward ms |',
                '| --- | --- | --- | --- |']
        for r in sk['rows']:
            out.append(f'| {r["T"]} | {r["col_err"]:.4f} | '
                       f'{r["out_dev"]:.4f} | {r["time"] * 1e3:.1f} |')
        out.append('')
        tr = sk.get('trained')
        if tr:
            out += [f'The same on the features of a trained model '
                    f'({tr["config"]}, {tr["layers"]} SeT layers, 4 '
                    'validation images; worst layer):', '',
                    '| T | column error | output deviation |',
                    '| --- | --- | --- |']
            for r in tr['rows']:
                out.append(f'| {r["T"]} | {r["col_err"]:.4f} | '
                           f'{r["out_dev"]:.4f} |')
            out.append('')
    return '\n'.join(out)


def _kernel_shares(rows, top: int = 8) -> list:
    """Markdown: where the first setting's fp32 steps of SeTformer-T
    (auto and Triton) and Swin-T spend their GPU time, operator by
    operator (the report's json has the kernels too)."""
    rows = [r for r in rows if r.get('ops') and
            r['setting'] == rows[0]['setting'] and 'AMP' not in r['mode'] and
            r['model'] in ('SeTformer-T', 'SeTformer-T (Triton SeT)',
                           'Swin-T')]
    if not rows:
        return []
    out = [f'Where the GPU time goes ({rows[0]["setting"]}; torch.profiler: '
           'the time of the CUDA kernels each operator launched itself, in '
           f'one call; the top {top} and the rest):', '',
           '| mode | model | operator | calls | ms | share |',
           '| --- | --- | --- | --- | --- | --- |']
    for r in rows:
        out += [f'| {r["mode"]} | {r["model"]} | `{k["kernel"][:60]}` | '
                f'{k["calls"]} | {k["ms"]:,.2f} | {k["share"]:.0%} |'
                for k in _fold(r['ops'], top, '(the rest)')]
    return out + ['']


def plot(report, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    op = report['operator']
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ns = sorted({r['n'] for r in op['rows']})
    for ax, key, label in ((axes[0], 'time', 'time (s)'),
                           (axes[1], 'peak_mem', 'peak memory (bytes)')):
        for name, color in (('SeT', 'C0'), ('SeT (reference)', 'C7'),
                            ('softmax (SDPA)', 'C3'), ('window 7x7', 'C2'),
                            ('softmax (SDPA flash, bf16)', 'C1'),
                            ('SeT (triton)', 'C4')):
            for mode, ls in (('forward', '-'), ('forward+backward', '--')):
                pts = [(r['n'], r[key]) for r in op['rows']
                       if r['op'] == name and r['mode'] == mode]
                if not pts:
                    continue
                ax.plot(*zip(*pts), ls, color=color, marker='o',
                        label=f'{name}, {mode}')
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel('tokens n')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which='both')
    axes[0].legend(fontsize=7)
    fig.suptitle(f'SeT (m = {op["m"]}) vs softmax vs 7×7 windows — '
                 f'{report["machine"]}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    kernel = f'SeT CPU kernel {fused_cpu.ISA}' if fused_cpu.available() \
        else 'no SeT CPU kernel'
    return (f'{cpu}, {torch.get_num_threads()} threads, torch '
            f'{torch.__version__}, {kernel}')


def write_report(report: dict, out: str, name: str, t0: float) -> str:
    """``name``.json and ``name``.md in ``out``; returns the markdown."""
    choices = measured_choices()  # what `auto` measured (CUDA)
    if choices:
        report['set_choices'] = [{k: v for k, v in c.items() if k != 'key'}
                                 for c in choices]
    report['seconds'] = time.time() - t0
    with open(osp.join(out, f'{name}.json'), 'w') as f:
        json.dump(report, f, indent=1)
    md = to_markdown(report)
    with open(osp.join(out, f'{name}.md'), 'w') as f:
        f.write(md + f'\nTotal benchmark time: {report["seconds"]:.0f} s.\n')
    return md


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--only', nargs='+',
                   choices=['operator', 'backbone', 'model', 'sinkhorn',
                            'compile'],
                   help='parts to run (default: all but compile, which '
                   'takes minutes of compiling: --only compile)')
    p.add_argument('--quick', action='store_true')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default=osp.join(ROOT, 'results'))
    p.add_argument('--plan-config', default=osp.join(
        ROOT, 'configs', 'mask_rcnn_setformer_nano_shapes_demo.py'))
    p.add_argument('--plan-checkpoint', default=osp.join(
        ROOT, 'demo_out', 'det', 'work_dir', 'epoch_24.pth'),
        help='trained model whose features the Sinkhorn part also uses '
        '(skipped when missing; `make demo` writes the default)')
    p.add_argument('--models', nargs='+', metavar='NAME',
                   help='backbones to run, with their forced-SeT variants '
                   '(Swin-T, the reference, always runs), e.g. SeTformer-T;'
                   ' a variant by its full name runs its model with it '
                   'alone')
    p.add_argument('--settings', nargs='+', metavar='LABEL',
                   help='backbone settings to run, by the start of their '
                   'label, e.g. 224x224 (default: all)')
    p.add_argument('--swin', choices=['auto', 'mmdet', 'timm'],
                   default='auto', help='the Swin baselines: mmdet\'s '
                   'backbone (auto: where mmdet imports) or timm\'s')
    p.add_argument('--malloc', choices=['keep', 'system'], default='keep',
                   help='keep: glibc keeps freed blocks for reuse, so no '
                   'candidate pays page faults for fresh activations on '
                   'every call (see keep_freed_memory); system: as is')
    args = p.parse_args()
    allocator = keep_freed_memory() if args.malloc == 'keep' else \
        'system allocator'
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    report = dict(machine=machine() if device.type == 'cpu' else
                  f'{torch.cuda.get_device_name(device)}, torch '
                  f'{torch.__version__}, CUDA {torch.version.cuda}, host '
                  f'{machine()}',
                  date=time.strftime('%Y-%m-%d'), quick=args.quick,
                  allocator=allocator)
    t0 = time.time()
    parts = args.only or ['operator', 'backbone', 'model'] + (
        ['sinkhorn'] if device.type == 'cpu' else [])
    name = 'benchmark' if device.type == 'cpu' else f'benchmark_{device.type}'
    if parts == ['compile']:  # (beside the full report, not over it)
        name += '_compile'

    global checkpoint

    def checkpoint() -> str:
        try:  # (a report that fails to render must not stop the run)
            return write_report(report, args.out, name, t0)
        except Exception:
            traceback.print_exc()
            return ''

    failed = []
    for part in parts:
        print(f'== {part}', flush=True)
        try:
            globals()[f'bench_{part}'](args, device, report)
        except Exception:  # the other parts still run (a short GPU lease)
            traceback.print_exc()
            failed.append(part)
        # the report so far after every part (a failed one's rows too): a
        # run stopped early (a GPU lease's time limit) keeps what it did
        md = checkpoint()
    plotted = bool(report.get('operator', {}).get('rows'))
    if plotted:
        plot(report, osp.join(args.out, f'{name}_scaling.png'))
    print('\n' + md)
    print(f'wrote {args.out}/{name}.md, {name}.json'
          f'{f", {name}_scaling.png" if plotted else ""} in '
          f'{report["seconds"]:.0f} s')
    if failed:
        sys.exit(f'failed: {", ".join(failed)} (tracebacks above)')


if __name__ == '__main__':
    main()
