"""Fused SeT for CUDA: Triton kernels that never store the n x m kernel.

With the features of ``_features``, ``log K_ij = qf_i . rf_j - M_i`` floored
at ``-LOG_KERNEL_FLOOR``, where ``M_i`` is the row max.  Every pass of SeT
is a product of ``K`` (or ``K^T``) with vectors or thin matrices, so each
Triton program rebuilds its tile of ``K`` from a tile of ``qf`` and one of
``rf`` (one ``tl.dot`` and one ``exp``), uses it, and drops it, as flash
attention does with its logits:

- ``_row_max``: ``M_i = max_j qf_i . rf_j`` (the first pass; the floor needs
  the final max, so it is not folded into later passes as an online max);
- ``_row_pass``: ``K @ vec`` and optionally ``K @ mat`` (row scalings
  ``u = K b``, the redistribution ``K [b^ z]``, and their gradients);
- ``_col_pass``: ``K^T @ vec`` and optionally ``K^T @ mat`` (column sums
  ``s = K^T a``, the aggregation ``K^T [a^ v]``, and their gradients);
- ``_grad_rows`` / ``_grad_cols``: ``dL/dqf = G rf`` and ``dL/drf = G^T qf``
  with ``G = K * (U V^T)`` on the unclamped entries, where ``U V^T`` is
  ``dL/dK`` gathered as in the reference backward (one rank-(d+1) term per
  aggregation, one rank-1 term per Sinkhorn product).

The orchestration between passes (O(n + m) vectors per slice) is the
reference's math, step for step, in torch: the result is the same function
with the exact gradients of the T unrolled iterations.  No atomics: every
output element is written by one program, so results are deterministic.

Products accumulate in fp32 (fp64 for fp64 inputs).  ``tl.dot``'s input
precision is ``MMSETFORMER_SET_PRECISION``: ``ieee`` (full fp32, the
default), ``tf32x3`` or ``tf32`` (tensor cores; the logits carry ``1/eps``,
so TF32's 10-bit mantissa moves them by ~1e-3 / eps: measure before
choosing it).  Triton is imported on first use only; on the CPU the kernels
run under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""
import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .set_attention import _grads_from_slices, _safe_div, _safe_div_grad

PRECISIONS = ('ieee', 'tf32x3', 'tf32')
# Tile sizes: rows and references per program (powers of two, >= 16).
BLOCK_N = int(os.environ.get('MMSETFORMER_TRITON_BLOCK_N', 64))
BLOCK_M = int(os.environ.get('MMSETFORMER_TRITON_BLOCK_M', 64))
# the backward's dL/dK = U V^T is formed over r = 2d + 3 + 2T in chunks
R_CHUNK = 32


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET') == '1'


@functools.lru_cache(None)
def _triton():
    """(triton, kernels) or an ImportError's message."""
    try:
        import triton

        from . import _triton_kernels as k
    except ImportError as e:
        return str(e)
    return triton, dict(row_max=k._row_max, row_pass=k._row_pass,
                        col_pass=k._col_pass, grad_rows=k._grad_rows,
                        grad_cols=k._grad_cols)


def why_unavailable(x: Tensor) -> str:
    """'' if the Triton kernels can run on ``x``'s device, else why not."""
    if x.dtype not in (torch.float32, torch.float64):
        return f'features must be fp32 or fp64, got {x.dtype}'
    if x.device.type == 'cpu' and not _interpreting():
        return 'inputs are on the CPU (Triton runs them only with ' \
            'TRITON_INTERPRET=1)'
    if x.device.type not in ('cuda', 'cpu'):
        return f'inputs are on {x.device}'
    t = _triton()
    return t if isinstance(t, str) else ''


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return 'ieee'
    p = os.environ.get('MMSETFORMER_SET_PRECISION', 'ieee')
    if p not in PRECISIONS:
        raise ValueError(f'MMSETFORMER_SET_PRECISION must be one of '
                         f'{PRECISIONS}, got {p!r}')
    return p


def _programs(x: Tensor) -> int:
    """Programs that keep the device busy: 4 per multiprocessor on a GPU;
    under the interpreter enough that the tests' small inputs split too."""
    if x.device.type == 'cuda':
        return 4 * torch.cuda.get_device_properties(
            x.device).multi_processor_count
    return 64


# Software-pipelining depths, tried in turn: Triton's default first; a GPU
# with less shared memory per block (99 KB on sm_86/89, 163 KB on sm_80, 227
# KB on sm_90) runs a shallower pipeline instead of failing to launch.
STAGES = (3, 2, 1)
_STAGES_THAT_FIT = {}  # (kernel, warps, constexprs, device) -> depth
# Warps per program: 4 (Triton's default) for the vector passes; 8 for the
# passes that also carry a matrix and for the gradient kernels, whose live
# tiles at 4 warps overflow the 255 registers of a thread (ptxas, sm_90, 64
# x 64 tiles: 440-690 bytes of spills per thread at 4 warps, 0-210 at 8).
WARPS, WARPS_WIDE = 4, 8


def _launch(kernel, grid, *args, warps: int = WARPS, **meta) -> None:
    """``kernel[grid](*args, **meta)`` at the deepest pipeline that fits."""
    from triton.runtime.errors import OutOfResources
    key = (kernel, warps, tuple(sorted(meta.items())), args[0].device)
    err = None
    for stages in ([_STAGES_THAT_FIT[key]]
                   if key in _STAGES_THAT_FIT else STAGES):
        try:
            kernel[grid](*args, num_warps=warps, num_stages=stages, **meta)
        except OutOfResources as e:
            err = e
            continue
        _STAGES_THAT_FIT[key] = stages
        return
    raise RuntimeError(
        f'SeT Triton kernel {getattr(kernel, "__name__", kernel)} {meta} does '
        f'not fit this GPU even unpipelined ({err}); smaller tiles: '
        'MMSETFORMER_TRITON_BLOCK_N=32 MMSETFORMER_TRITON_BLOCK_M=32, or '
        'MMSETFORMER_SET_BACKEND=reference') from err


def _p2(x: int) -> int:
    """Power of two >= max(x, 16) (tl.dot's smallest dimension)."""
    return max(16, 1 << (max(1, x) - 1).bit_length())


class _Passes:
    """The kernels bound to one slice batch: qf (S, n, dp), rf (H, m, dp),
    and the row maxima ``Mx`` (S, n) of their logits (computed if None)."""

    def __init__(self, qf: Tensor, rf: Tensor, Mx: Optional[Tensor] = None):
        triton, self.k = _triton()
        self.qf, self.rf = qf, rf
        (self.S, self.n, self.dp), (self.H, self.m) = qf.shape, rf.shape[:2]
        self.prec = _precision(qf.dtype)
        # float64 tiles take twice the shared memory: half the rows
        cap = 32 if qf.dtype == torch.float64 else 1 << 30
        self.BN = min(BLOCK_N, cap, _p2(self.n))
        self.BM = min(BLOCK_M, cap, _p2(self.m))
        self.BD = _p2(self.dp)
        self.rows_grid = (triton.cdiv(self.n, self.BN), self.S)
        # column passes: m / BM blocks per slice are too few programs for a
        # GPU, so the rows are split into Z chunks summed afterwards
        col_blocks = triton.cdiv(self.m, self.BM)
        row_blocks = triton.cdiv(self.n, self.BN)
        z = min(row_blocks, max(1, triton.cdiv(_programs(qf),
                                               col_blocks * self.S)))
        self.chunk = triton.cdiv(row_blocks, z) * self.BN
        self.Z = triton.cdiv(self.n, self.chunk)
        self.cols_grid = (col_blocks, self.S, self.Z)
        self.Mx = Mx
        if Mx is not None:
            return
        self.Mx = qf.new_empty(self.S, self.n)
        _launch(self.k['row_max'], self.rows_grid, qf, rf, self.Mx, self.n,
                self.m, self.dp, self.H, BN=self.BN, BM=self.BM, BD=self.BD,
                PREC=self.prec)

    def _pass(self, kernel, grid, size, vec, mat, parts=1, *extra):
        out_v = vec.new_empty(parts, self.S, size)
        out_m = None if mat is None else vec.new_empty(
            parts, self.S, size, mat.shape[-1])
        c = 1 if mat is None else mat.shape[-1]
        _launch(kernel, grid, self.qf, self.rf, self.Mx, vec.contiguous(),
                out_v if mat is None else mat.contiguous(), out_v,
                out_v if mat is None else out_m, self.n, self.m, self.dp, c,
                self.H, *extra, warps=WARPS if mat is None else WARPS_WIDE,
                BN=self.BN, BM=self.BM, BD=self.BD, BC=_p2(c),
                HAS_MAT=mat is not None, PREC=self.prec)
        out_v = out_v.sum(0)
        return out_v if mat is None else (out_v, out_m.sum(0))

    def rows(self, vec: Tensor, mat: Optional[Tensor] = None):
        """K vec (S, n) [and K mat (S, n, c)] for vec (S, m), mat (S, m, c)."""
        return self._pass(self.k['row_pass'], self.rows_grid, self.n, vec,
                          mat)

    def cols(self, vec: Tensor, mat: Optional[Tensor] = None):
        """K^T vec (S, m) [and K^T mat (S, m, c)] for vec (S, n), mat."""
        return self._pass(self.k['col_pass'], self.cols_grid, self.m, vec,
                          mat, self.Z, self.chunk)

    def logit_grads(self, U: Tensor, V: Tensor, need_q: bool,
                    need_r: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """dL/dqf (S, n, dp) and per-slice dL/drf (S, m, dp) for dL/dK = U
        V^T (U: (S, n, r), V: (S, m, r))."""
        r = U.shape[-1]
        U, V = U.contiguous(), V.contiguous()
        args = dict(warps=WARPS_WIDE, BN=self.BN, BM=self.BM, BD=self.BD,
                    BR=min(_p2(r), R_CHUNK), PREC=self.prec)
        gq = gr = None
        if need_q:
            gq = self.qf.new_empty(self.S, self.n, self.dp)
            _launch(self.k['grad_rows'], self.rows_grid, self.qf, self.rf,
                    self.Mx, U, V, gq, self.n, self.m, self.dp, r, self.H,
                    **args)
        if need_r:
            gr = self.qf.new_empty(self.Z, self.S, self.m, self.dp)
            _launch(self.k['grad_cols'], self.cols_grid, self.qf, self.rf,
                    self.Mx, U, V, gr, self.n, self.m, self.dp, r, self.H,
                    self.chunk, **args)
            gr = gr.sum(0)
        return gq, gr


def _to_slices(qf: Tensor, rf: Tensor,
               v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, h, n, d') qf, (1, h, m, d') rf, (B, h, n, d) v -> contiguous
    (B*h, n, d'), (h, m, d'), (B*h, n, d)."""
    B, h, n, dp = qf.shape
    return (qf.reshape(B * h, n, dp).contiguous(),
            rf.reshape(h, rf.shape[-2], dp).contiguous(),
            v.reshape(B * h, n, v.shape[-1]).contiguous())


def _top(x: Tensor) -> Tensor:
    return x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class SeTTritonFunction(torch.autograd.Function):
    """Same contract as the reference ``_SeTFunction``: (qf (B,h,n,d'),
    rf (1,h,m,d'), v (B,h,n,d), T) -> y (B,h,n,d)."""

    @staticmethod
    def forward(ctx, qf: Tensor, rf: Tensor, v: Tensor, num_iters: int):
        (B, h, n, d), m = v.shape, rf.shape[-2]
        qf3, rf3, v3 = _to_slices(qf, rf, v)
        ops = _Passes(qf3, rf3)
        # Sinkhorn, as sinkhorn_scalings: b_0 = 1, u_t = K b_t,
        # a_t = 1 / (n u_t), s_t = K^T a_t, b_{t+1} = 1 / (m s_t)
        b = qf3.new_ones(B * h, m)
        steps = []
        for _ in range(num_iters):
            u = ops.rows(b)
            a = _safe_div(1.0 / n, u)
            s = ops.cols(a)
            steps.append((b, u, a, s))
            b = _safe_div(1.0 / m, s)
        u = ops.rows(b)
        a = _safe_div(1.0 / n, u)
        a_top, b_top = _top(a), _top(b)
        a_hat, b_hat = a / a_top, b / b_top
        # z = K^T [a^ v] / K^T a^;  y = K [b^ z] / K b^
        s4, Zt = ops.cols(a_hat, a_hat.unsqueeze(-1) * v3)
        z = Zt / s4.unsqueeze(-1)
        w, Yt = ops.rows(b_hat, b_hat.unsqueeze(-1) * z)
        y = Yt / w.unsqueeze(-1)
        if any(ctx.needs_input_grad[:3]):
            flat = [t for step in steps for t in step]
            ctx.save_for_backward(qf3, rf3, v3, ops.Mx, a_top, b_top, s4, z,
                                  w, y, b, u, a, *flat)
            ctx.dims = B, h, num_iters
        return y.view(B, h, n, d)

    @staticmethod
    def backward(ctx, gy: Tensor):
        (qf3, rf3, v3, Mx, a_top, b_top, s4, z, w, y, b_T, u_T, a_T,
         *flat) = ctx.saved_tensors
        B, h, T = ctx.dims
        ops = _Passes(qf3, rf3, Mx)
        gy = gy.reshape(y.shape)
        a_hat, b_hat = a_T / a_top, b_T / b_top
        left, right = [], []
        # y = Y~ / w with [Y~ | w] = K [b^ z | b^]
        gY = gy / w.unsqueeze(-1)
        gw = -(gY * y).sum(-1)
        left.append(torch.cat([gY, gw.unsqueeze(-1)], -1))
        right.append(torch.cat([b_hat.unsqueeze(-1) * z,
                                b_hat.unsqueeze(-1)], -1))
        gX5_v, gX5_m = ops.cols(gw, gY)
        gz = b_hat.unsqueeze(-1) * gX5_m
        gb_hat = (z * gX5_m).sum(-1) + gX5_v
        # z = Z~ / s4 with [Z~ | s4] = K^T [a^ v | a^]
        gZ = gz / s4.unsqueeze(-1)
        gs4 = -(gZ * z).sum(-1)
        left.append(torch.cat([a_hat.unsqueeze(-1) * v3,
                               a_hat.unsqueeze(-1)], -1))
        right.append(torch.cat([gZ, gs4.unsqueeze(-1)], -1))
        gX4_v, gX4_m = ops.rows(gs4, gZ)
        gv = a_hat.unsqueeze(-1) * gX4_m
        ga = ((v3 * gX4_m).sum(-1) + gX4_v) / a_top
        gb = gb_hat / b_top
        # Sinkhorn in reverse, as the reference backward
        gu = _safe_div_grad(ga, a_T, u_T)
        left.append(gu.unsqueeze(-1))
        right.append(b_T.unsqueeze(-1))
        gb = gb + ops.cols(gu)
        steps = [flat[4 * t:4 * t + 4] for t in range(T)]
        for t in reversed(range(T)):
            b_t, u_t, a_t, s_t = steps[t]
            b_next = steps[t + 1][0] if t + 1 < T else b_T
            gs = _safe_div_grad(gb, b_next, s_t)
            left.append(a_t.unsqueeze(-1))
            right.append(gs.unsqueeze(-1))
            gu = _safe_div_grad(ops.rows(gs), a_t, u_t)
            left.append(gu.unsqueeze(-1))
            right.append(b_t.unsqueeze(-1))
            if t > 0:
                gb = ops.cols(gu)
        need_q, need_r = ctx.needs_input_grad[:2]
        gq, gr = ops.logit_grads(torch.cat(left, -1), torch.cat(right, -1),
                                 need_q, need_r)
        return _grads_from_slices(B, h, gq, gr, gv)
