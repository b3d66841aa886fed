"""Fused SeT for CUDA: Triton kernels that build the n x m kernel once and
read it in every pass, or, for kernels above :data:`STREAM_BYTES`, never
store it.

With the features of ``_features``, ``log K_ij = x_i . y_j + tp_i . rp_j -
M_i`` floored at ``-LOG_KERNEL_FLOOR``: x the unit queries over eps, y the
unit references, tp / rp the positional encoding's (k + 2)-dim features and
``M_i`` the row max.  Every pass of SeT is a product of ``K`` (or ``K^T``)
with vectors or thin matrices.  A kept ``K`` is built once (a dot over d
and an exp per entry) and each pass loads its tiles; a streamed one is
never stored: each Triton program rebuilds its tile of ``K`` from tiles of
the features (one ``tl.dot`` over d, k + 2 rank-1 terms, or none where the
position features fit in the dot's padding, and one ``exp``), uses it, and
drops it, as flash attention does with its logits:

- ``_build``: ``M_i = max_j`` of the logits (the first pass; the floor
  needs the final max, so it is not folded into later passes as an online
  max) and, kept, ``K`` itself;
- ``_row_pass``: ``K @ vec`` and optionally ``K @ mat`` (row scalings
  ``u = K b``, the redistribution ``K [b^ z]``, and their gradients);
- ``_col_pass``: ``K^T @ vec`` and optionally ``K^T @ mat`` (column sums
  ``s = K^T a``, the aggregation ``K^T [a^ v]``, and their gradients);
- ``_step_pass`` (kept ``K`` only): a Sinkhorn step ``u = K b``, ``a = 1 /
  (n u)``, ``s = K^T a`` in one pass, a program's rows then the same tiles
  again from the cache, and likewise a reversed step of the backward;
- ``_grad_rows`` / ``_grad_cols``: ``dL/dx = G y`` and ``dL/d[y | rp] = G^T
  [x | tp]`` with ``G = K * (U V^T)`` on the unclamped entries, where ``U
  V^T`` is ``dL/dK`` gathered as in the reference backward (one rank-(d+1)
  term per aggregation, one rank-1 term per Sinkhorn product).  Kept,
  ``_grad_rows`` writes ``G`` over ``K`` and the two products are batched
  GEMMs (torch's).

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
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .set_attention import (FUSED_CUDA_MIN_BYTES, NORM_DELTA,
                            FusedImplementation, _safe_div, _safe_div_grad,
                            _unit, heads_last, module_setting)

PRECISIONS = ('ieee', 'tf32x3', 'tf32')
# Tile sizes: rows and references per program (powers of two, >= 16).
BLOCK_N = int(os.environ.get('MMSETFORMER_TRITON_BLOCK_N', 64))
BLOCK_M = int(os.environ.get('MMSETFORMER_TRITON_BLOCK_M', 64))


# A call whose kernel (all its B*h slices: they run at once) takes at most
# this many bytes keeps it: built once, (B*h, n, m), and read by every
# pass, as the reference and the CPU kernel keep theirs; a larger one is
# rebuilt tile by tile in every pass and never stored (flash attention's
# way: O(n + m) memory per slice).  A kept tile costs a 4-byte load per
# entry where a rebuilt one costs a dot over the head dim and an exp
# (SeTformer: ~32 FMAs per entry per pass, of which a forward makes 2T + 4
# and a backward more).  The default is the size above which `auto`
# takes these kernels outright because the reference would hold too much
# (set_attention.FUSED_CUDA_MIN_BYTES): below it `auto` times them, kept,
# against the reference.
STREAM_BYTES = int(float(os.environ.get('MMSETFORMER_SET_TRITON_STREAM_BYTES',
                                        FUSED_CUDA_MIN_BYTES)))


def stream_above(nbytes: int):
    """Inside, calls whose kernel exceeds ``nbytes`` rebuild its tiles in
    every pass (0: every call); the default is :data:`STREAM_BYTES` as set
    at import."""
    return module_setting(globals(), 'STREAM_BYTES', nbytes)


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
    return triton, dict(build=k._build, row_pass=k._row_pass,
                        col_pass=k._col_pass, step_pass=k._step_pass,
                        grad_rows=k._grad_rows, grad_cols=k._grad_cols)


def why_unavailable(x: Tensor) -> str:
    """'' if the Triton kernels can run on ``x``'s device, else why not."""
    if x.dtype not in (torch.float32, torch.float64):
        return f'features must be fp32 or fp64, got {x.dtype}'
    if x.device.type == 'cpu' and not _interpreting():
        return 'inputs are on the CPU (Triton runs them only with ' \
            'TRITON_INTERPRET=1)'
    if x.device.type not in ('cuda', 'cpu'):
        return f'inputs are on {x.device}'
    return _import_error()


@torch.compiler.assume_constant_result
def _import_error() -> str:
    """'' once Triton and the kernels import, else why not (dynamo takes
    it as a constant instead of tracing the import)."""
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


# The compute capability the tiles are chosen for where Triton interprets
# (no GPU): tools/triton_report.py sets it to the GPU it compiles for.
INTERPRETED_CC = (9, 0)


def _capability(x: Tensor) -> Tuple[int, int]:
    if x.device.type == 'cuda':
        return torch.cuda.get_device_capability(x.device)
    return INTERPRETED_CC


# Software-pipelining depths, tried in turn: Triton's default first; a GPU
# with less shared memory per block (99 KB on sm_86/89, 163 KB on sm_80, 227
# KB on sm_90) runs a shallower pipeline instead of failing to launch.
STAGES = (3, 2, 1)
_STAGES_THAT_FIT = {}  # (kernel, warps, constexprs, device) -> depth
# Warps per program, and row tiles: 32 rows for the kernels that carry a
# matrix (the aggregations, the gradients) and wherever the head dim pads
# past 32, else 64.  With fewer warps or taller tiles, live tiles overflow
# the 255 registers of a thread on some GPU and spill to local memory
# (``tools/triton_report.py`` shows it on any machine: e.g. sm_80 at 64
# rows, d = 32); ``test_triton_kernels_fit_gpus`` keeps the tile loops
# free of spills at d = 28, 32 and 40 on sm_80, sm_86 and sm_90, in fp32
# and 3xTF32.
WARPS, WIDE_ROWS = 8, 32
# dL/dK = U V^T is rebuilt on a tile in chunks of 16 of its rank r (2d + 3
# + 2T): tl.dot's least depth pads r the least, and smaller chunks keep
# the gradient kernels' registers within a thread's (32 spilled inside
# the tile loop on sm_80 at d = 40)
R_CHUNK = 16


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(x: int, least: int = 16) -> int:
    """Power of two >= max(x, least) (16: tl.dot's smallest dimension)."""
    return max(least, 1 << (max(1, x) - 1).bit_length())


class _Passes:
    """The kernels bound to one slice batch: queries' features x (S, n, d),
    the references' y (H, m, d), the position features tp (n, KP) and rp
    (H, m, KP) (KP = 0 without LPE), so that log K + M = x y^T + tp rp^T,
    and the row maxima ``Mx`` (S, n) of those logits (computed if None).
    With ``keep``, K is built once into an (S, n, m) buffer that the passes
    read (see :data:`STREAM_BYTES`)."""

    def __init__(self, x: Tensor, y: Tensor, tp: Tensor, rp: Tensor,
                 Mx: Optional[Tensor] = None, keep: bool = False):
        self.k = _triton()[1]
        (self.S, self.n, self.d_x), (self.H, self.m) = x.shape, y.shape[:2]
        kp = tp.shape[1]
        if kp and _p2(self.d_x + kp) == _p2(self.d_x):
            # the position features fit in the dot's padding (SeTformer's
            # head dims 28 and 40 with 2-D positions): one dot, no
            # element-wise terms, and dL/drp comes out of dL/dy's columns
            x = torch.cat([x, tp.expand(self.S, -1, -1)], -1)
            y = torch.cat([y, rp], -1)
            tp, rp = tp[:, :0], rp[..., :0]
        self.feats = (x, y, tp, rp)
        self.d, self.kp = x.shape[-1], tp.shape[1]
        self.prec = _precision(x.dtype)
        # float64 tiles take twice the shared memory: half the rows
        cap = 32 if x.dtype == torch.float64 else 1 << 30
        BD = _p2(self.d)
        self.BN = min(BLOCK_N, cap, _p2(self.n), 2 * WIDE_ROWS if BD <= 32
                      else WIDE_ROWS)
        self.BM = min(BLOCK_M, cap, _p2(self.m))
        self.meta = dict(KP=self.kp, BN=self.BN, BM=self.BM, BD=BD,
                         PREC=self.prec)
        self.wide = dict(self.meta, BN=min(self.BN, WIDE_ROWS))
        # Under TF32 (which keeps hi / lo halves of each dot's inputs) the
        # row-side wide kernels sweep their columns in narrower tiles, and
        # before Hopper (mma.sync, no wgmma) the column-side ones own
        # narrower column blocks too; else they spill inside their loops
        narrow = dict(self.wide, BM=min(self.BM, WIDE_ROWS))
        tf32 = self.prec != 'ieee'
        self.wide_rows = narrow if tf32 else self.wide
        self.wide_cols = narrow if tf32 and _capability(x) < (9, 0) \
            else self.wide
        # (kept, the row passes with a matrix spill inside their loops on
        # sm_80 in wide tiles at head dims 33-64, BC = 64)
        self.kept_rows = narrow
        find = Mx is None
        self.Mx = x.new_empty(self.S, self.n) if find else Mx
        self.K = x.new_empty(self.S, self.n, self.m) if keep else None
        if find or keep:
            # in 32-row tiles: its two dots over 64 rows held 255
            # registers a thread (spilling; one program per multiprocessor
            # on an H200, where it took 44 of the forward's 109 ms), 32
            # rows ~105 (tools/triton_report.py)
            _launch(self.k['build'], self._rows_grid(self.wide),
                    *self.feats, self.Mx, self._kp(), self.n, self.m,
                    self.d, self.H, FIND_MAX=find, STORE=keep, **self.wide)

    def _kp(self) -> Tensor:
        """The kept kernel, or a stand-in pointer that nothing reads."""
        return self.Mx if self.K is None else self.K

    def _rows_grid(self, meta: dict) -> tuple:
        return (_cdiv(self.n, meta['BN']), self.S)

    def _cols_grid(self, meta: dict) -> Tuple[tuple, int]:
        """(grid, chunk) of a column-side kernel: m / BM blocks per slice
        are too few programs for a GPU, so the rows are split into Z
        chunks (of whole row tiles of either height) summed afterwards."""
        col_blocks = _cdiv(self.m, meta['BM'])
        row_blocks = _cdiv(self.n, self.BN)
        z = min(row_blocks, max(1, _cdiv(_programs(self.feats[0]),
                                         col_blocks * self.S)))
        chunk = _cdiv(row_blocks, z) * self.BN
        return (col_blocks, self.S, _cdiv(self.n, chunk)), chunk

    def _pass(self, kernel, rows: bool, size, vec, mat):
        kept = self.K is not None
        meta = self.meta if mat is None else self.wide_cols if not rows \
            else self.kept_rows if kept else self.wide_rows
        if rows:
            grid, extra = self._rows_grid(meta), ()
        else:
            grid, chunk = self._cols_grid(meta)
            extra = (chunk, )
        out_v = vec.new_empty(1 if rows else grid[2], self.S, size)
        out_m = None if mat is None else vec.new_empty(
            *out_v.shape, mat.shape[-1])
        c = 1 if mat is None else mat.shape[-1]
        _launch(kernel, grid, *self.feats, self.Mx, self._kp(),
                vec.contiguous(), out_v if mat is None else mat.contiguous(),
                out_v, out_v if mat is None else out_m, self.n, self.m,
                self.d, c, self.H, *extra, BC=_p2(c),
                HAS_MAT=mat is not None, KEPT=kept, **meta)
        if mat is None:
            return _parts_sum(out_v)
        return _parts_sum(out_v), _parts_sum(out_m)

    def rows(self, vec: Tensor, mat: Optional[Tensor] = None):
        """K vec (S, n) [and K mat (S, n, c)] for vec (S, m), mat (S, m, c)."""
        return self._pass(self.k['row_pass'], True, self.n, vec, mat)

    def cols(self, vec: Tensor, mat: Optional[Tensor] = None):
        """K^T vec (S, m) [and K^T mat (S, m, c)] for vec (S, n), mat."""
        return self._pass(self.k['col_pass'], False, self.m, vec, mat)

    def step(self, vec: Tensor, grad_of: Optional[Tuple[Tensor, Tensor]]
             = None) -> Tuple[Tensor, ...]:
        """One Sinkhorn step in one pass over the kept K (``_step_pass``):
        (u = K vec, a = 1/(n u) guarded, K^T a) for vec = b (S, m); with
        ``grad_of`` = (a_t, u_t), the reverse step's (gu, K^T gu) for the
        guarded division's gradient gu of K vec."""
        n, grad = self.n, grad_of is not None
        meta = dict(BN=self.BN, BM=self.BM)
        out_r = vec.new_empty(self.S, n)
        out_a = out_r if grad else vec.new_empty(self.S, n)
        out_c = vec.new_empty(_cdiv(n, self.BN), self.S, self.m)
        # (filled on the device: a copy from the host could synchronise)
        consts = vec.new_full((2, ), 1.0 / n)
        consts[0] = torch.finfo(vec.dtype).tiny
        a_t, u_t = (t.contiguous() for t in grad_of) if grad else (out_r, ) * 2
        _launch(self.k['step_pass'], self._rows_grid(meta), self.K,
                vec.contiguous(), consts, a_t, u_t, out_r, out_a, out_c, n,
                self.m, GRAD=grad, **meta)
        return (out_r, _parts_sum(out_c)) if grad else \
            (out_r, out_a, _parts_sum(out_c))

    def logit_grads(self, U: Tensor, V: Tensor, need_x: bool,
                    need_y: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """dL/dx (S, n, d) and per slice [dL/dy | dL/drp] (S, m, d + KP) for
        dL/dK = U V^T (U: (S, n, r), V: (S, m, r)).  The last pass: a kept
        kernel holds G = dL/dlogK afterwards, and the gradients are two
        batched GEMMs with it; else each side rebuilds G on its tiles."""
        r = U.shape[-1]
        U, V = U.contiguous(), V.contiguous()
        x, y, tp, rp = self.feats
        gx = gy = None
        if self.K is not None:
            G, self.K = self.K, None
            # (wide tiles in every precision: narrow ones spill inside the
            # loop on sm_80 in 3xTF32 at d = 28, ptxas holding them to 128
            # registers)
            _launch(self.k['grad_rows'], self._rows_grid(self.wide),
                    *self.feats, self.Mx, G, U, V, self.Mx, self.n, self.m,
                    self.d, r, self.H, BR=R_CHUNK, KEPT=True, **self.wide)
            if need_x:  # (the slices of head h: G[b h + h] y[h])
                gx = torch.matmul(G.view(-1, self.H, self.n, self.m),
                                  y[..., :self.d_x]).flatten(0, 1)
            if need_y:
                gy = torch.matmul(G.transpose(-1, -2), torch.cat(
                    [x, tp.expand(self.S, -1, -1)], -1) if self.kp else x)
            return gx, gy
        if need_x:
            gx = x.new_empty(self.S, self.n, self.d)
            _launch(self.k['grad_rows'], self._rows_grid(self.wide_rows),
                    *self.feats, self.Mx, self.Mx, U, V, gx, self.n, self.m,
                    self.d, r, self.H, BR=R_CHUNK, KEPT=False,
                    **self.wide_rows)
            gx = gx[..., :self.d_x]  # (folded token positions: constants)
        if need_y:
            grid, chunk = self._cols_grid(self.wide_cols)
            gy = U.new_empty(grid[2], self.S, self.m, self.d)
            gp = U.new_empty(grid[2], self.S, self.m, self.kp)
            _launch(self.k['grad_cols'], grid, *self.feats, self.Mx, U, V,
                    gy, gp, self.n, self.m, self.d, r, self.H, chunk,
                    BP=_p2(self.kp, 1), POS_GRAD=self.kp > 0, BR=R_CHUNK,
                    **self.wide_cols)
            gy = _parts_sum(torch.cat([gy, gp], -1))
        return gx, gy


def _parts_sum(x: Tensor) -> Tensor:
    """The sum of a column pass's Z partial results (Z, ...); one part
    (every row pass, and small n) launches nothing."""
    return x[0] if x.shape[0] == 1 else x.sum(0)


def _top(x: Tensor) -> Tensor:
    return x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _query_features(q: Tensor, eps: float) -> Tensor:
    """x = q / (|q| + NORM_DELTA) / eps, the queries' part of ``_features``,
    as (B*h, n, d)."""
    return (_unit(q) / eps).flatten(0, 1).contiguous()


# The kernels' orchestration as two torch.library operators (forward,
# backward): torch.compile keeps them in its graphs instead of tracing the
# launches.  The forward returns y (B, h, n, d; heads_last) and what the
# backward needs, per slice (S = B*h): the row maxima of the logits Mx (n),
# the scalings' maxima a_top, b_top (1), s4 (m), z (m, d), w (n), the last
# b (m), u, a (n), and for each Sinkhorn step t < T its b_t (m), u_t, a_t
# (n), s_t (m).
@torch.library.custom_op('mmsetformer::set_triton_forward', mutates_args=())
def _forward(q: Tensor, tok: Tensor, rf3: Tensor, v: Tensor, eps: float,
             num_iters: int, stream_bytes: int) -> List[Tensor]:
    (B, h, n, _), m = v.shape, rf3.shape[1]
    ops, v3 = _bind(q, tok, rf3, v, eps, stream_bytes)
    # Sinkhorn, as sinkhorn_scalings: b_0 = 1, u_t = K b_t,
    # a_t = 1 / (n u_t), s_t = K^T a_t, b_{t+1} = 1 / (m s_t)
    b = v3.new_ones(B * h, m)
    steps = []
    for _ in range(num_iters):
        if ops.K is not None:  # kept: the step in one pass over K
            u, a, s = ops.step(b)
        else:
            u = ops.rows(b)
            a = _safe_div(1.0 / n, u)
            s = ops.cols(a)
        steps += [b, u, a, s]
        b = _safe_div(1.0 / m, s)
    u = ops.rows(b)
    a = _safe_div(1.0 / n, u)
    a_top, b_top = _top(a), _top(b)
    a_hat, b_hat = a / a_top, b / b_top
    # z = K^T [a^ v] / K^T a^;  y = K [b^ z] / K b^
    s4, Zt = ops.cols(a_hat, a_hat.unsqueeze(-1) * v3)
    z = Zt / s4.unsqueeze(-1)
    w, Yt = ops.rows(b_hat, b_hat.unsqueeze(-1) * z)
    # written straight into heads_last's layout: no (B, h, n, d) temporary
    out = v3.new_empty(B, n, h, Yt.shape[-1]).transpose(1, 2)
    torch.div(Yt.view(B, h, n, -1), w.view(B, h, n, 1), out=out)
    return [out, ops.Mx, a_top, b_top, s4, z, w, b, u, a, *steps]


@_forward.register_fake
def _(q, tok, rf3, v, eps, num_iters, stream_bytes):
    (B, h, n, d), m = v.shape, rf3.shape[1]
    return [heads_last(q.new_empty(B, h, n, d))] + [
        q.new_empty(B * h, *s) for s in (
            (n, ), (1, ), (1, ), (m, ), (m, d), (n, ), (m, ), (n, ), (n, ),
            *[(m, ), (n, ), (n, ), (m, )] * num_iters)]


@torch.library.custom_op('mmsetformer::set_triton_backward',
                         mutates_args=())
def _backward(q: Tensor, tok: Tensor, rf3: Tensor, v: Tensor,
              fwd: List[Tensor], gy: Tensor, need_q: bool, need_r: bool,
              eps: float, stream_bytes: int) -> List[Tensor]:
    """[gq (S, n, d), grf (S, m, dp) per slice, gv (S, n, d)]; an empty
    tensor for a gradient not needed."""
    (y, Mx, a_top, b_top, s4, z, w, b_T, u_T, a_T, *flat) = fwd
    T = len(flat) // 4
    ops, v3 = _bind(q, tok, rf3, v, eps, stream_bytes, Mx)
    y, gy = (t.reshape(v3.shape) for t in (y, gy))  # (S, n, d)
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
        if t > 0 and ops.K is not None:  # kept: one pass over K
            gu, gb = ops.step(gs, (a_t, u_t))
        else:
            gu = _safe_div_grad(ops.rows(gs), a_t, u_t)
            if t > 0:
                gb = ops.cols(gu)
        left.append(gu.unsqueeze(-1))
        right.append(b_t.unsqueeze(-1))
    gx, gr = ops.logit_grads(torch.cat(left, -1), torch.cat(right, -1),
                             need_q, need_r)
    return [_unit_grad(q, gx, eps) if need_q else q.new_empty(0),
            gr if need_r else q.new_empty(0), gv]


def _bind(q: Tensor, tok: Tensor, rf3: Tensor, v: Tensor, eps: float,
          stream_bytes: int,
          Mx: Optional[Tensor] = None) -> Tuple['_Passes', Tensor]:
    """The kernels bound to the operators' inputs (the queries' features,
    the unit references and the position features apart), and v as
    (S, n, d); they keep the kernel unless it exceeds ``stream_bytes``."""
    (B, h, n, d), m = v.shape, rf3.shape[1]
    y, rp = (t.contiguous() for t in rf3.split([d, rf3.shape[-1] - d], -1))
    keep = B * h * n * m * v.element_size() <= stream_bytes
    return _Passes(_query_features(q, eps), y, tok.contiguous(), rp, Mx,
                   keep), v.reshape(-1, *v.shape[2:]).contiguous()


def _unit_grad(q: Tensor, gx: Tensor, eps: float) -> Tensor:
    """dL/dq (S, n, d) for dL/dx = gx, x = q / (|q| + NORM_DELTA) / eps
    (the chain rule autograd would apply to ``_unit``; where q = 0 the
    norm's gradient is 0, as torch's)."""
    q, gx = q.reshape(gx.shape), gx.contiguous()
    r = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    rd = r + NORM_DELTA
    g_norm = -(q * gx).sum(-1, keepdim=True) / (rd * rd)
    return (gx / rd + g_norm * q / torch.where(r > 0, r, 1)) / eps


# (q (B,h,n,d), tok (n, KP), rf (1,h,m,d+KP), v (B,h,n,d), eps, T) -> y
# (B,h,n,d): the reference ``_SeTFunction`` on the features of
# ``_features``, with the same contract as ``fused_cpu.IMPLEMENTATION``.
# The kernels take the features' positional part apart from the rest.
IMPLEMENTATION = FusedImplementation('triton', _forward, _backward,
                                     lambda: (STREAM_BYTES, ))
