"""Triton kernels of ``fused_triton`` (imported on first use: Triton resolves
the helpers a kernel calls among this module's globals)."""
import triton
import triton.language as tl

from .set_attention import LOG_KERNEL_FLOOR

FLOOR: tl.constexpr = tl.constexpr(float(LOG_KERNEL_FLOOR))


@triton.jit
def _tile(X, Y, Mx, s, h, rows, cols, n, m, dp, BD: tl.constexpr,
          PREC: tl.constexpr, MAXED: tl.constexpr):
    """Logits (or, with MAXED, K) of rows x cols of slice s, and the
    mask of real entries."""
    dd = tl.arange(0, BD)
    x = tl.load(X + (s * n + rows[:, None]) * dp + dd[None, :],
                mask=(rows[:, None] < n) & (dd[None, :] < dp), other=0.)
    y = tl.load(Y + (h * m + cols[:, None]) * dp + dd[None, :],
                mask=(cols[:, None] < m) & (dd[None, :] < dp), other=0.)
    logits = tl.dot(x, tl.trans(y), input_precision=PREC)
    valid = (rows[:, None] < n) & (cols[None, :] < m)
    if MAXED:
        mx = tl.load(Mx + s * n + rows, mask=rows < n, other=0.)
        shifted = tl.maximum(logits - mx[:, None], -FLOOR)
        return tl.where(valid, tl.exp(shifted), 0.), valid, \
            valid & (logits - mx[:, None] > -FLOOR)
    return logits, valid, valid


@triton.jit
def _row_max(X, Y, Mx, n, m, dp, heads, BN: tl.constexpr,
             BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    best = tl.full([BN], float('-inf'), Mx.dtype.element_ty)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        logits, valid, _ = _tile(X, Y, Mx, s, s % heads, rows, cols, n,
                                 m, dp, BD, PREC, False)
        logits = tl.where(valid, logits, float('-inf'))
        best = tl.maximum(best, tl.max(logits, axis=1))
    tl.store(Mx + s * n + rows, best, mask=rows < n)


@triton.jit
def _row_pass(X, Y, Mx, Vec, Mat, OutVec, OutMat, n, m, dp, c, heads,
              BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
              BC: tl.constexpr, HAS_MAT: tl.constexpr,
              PREC: tl.constexpr):
    """OutVec = K Vec, OutMat = K Mat (Vec: (S, m), Mat: (S, m, c))."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cc = tl.arange(0, BC)
    acc_v = tl.zeros([BN], OutVec.dtype.element_ty)
    acc_m = tl.zeros([BN, BC], OutVec.dtype.element_ty)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        K, _, _ = _tile(X, Y, Mx, s, s % heads, rows, cols, n, m, dp,
                        BD, PREC, True)
        vec = tl.load(Vec + s * m + cols, mask=cols < m, other=0.)
        acc_v += tl.sum(K * vec[None, :], axis=1)
        if HAS_MAT:
            mat = tl.load(Mat + (s * m + cols[:, None]) * c + cc[None, :],
                          mask=(cols[:, None] < m) & (cc[None, :] < c),
                          other=0.)
            acc_m += tl.dot(K, mat, input_precision=PREC)
    tl.store(OutVec + s * n + rows, acc_v, mask=rows < n)
    if HAS_MAT:
        tl.store(OutMat + (s * n + rows[:, None]) * c + cc[None, :],
                 acc_m, mask=(rows[:, None] < n) & (cc[None, :] < c))


@triton.jit
def _col_pass(X, Y, Mx, Vec, Mat, OutVec, OutMat, n, m, dp, c, heads, chunk,
              BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
              BC: tl.constexpr, HAS_MAT: tl.constexpr,
              PREC: tl.constexpr):
    """Partial OutVec = K^T Vec, OutMat = K^T Mat (Vec: (S, n), Mat: (S, n,
    c)) over row chunk z (program axis 2) into OutVec (Z, S, m), OutMat (Z,
    S, m, c): the caller sums over Z, so a few column blocks still fill the
    GPU and the result does not depend on scheduling (no atomics)."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    z = tl.program_id(2).to(tl.int64)
    out = z * tl.num_programs(1) + s  # (z, s) row of the partial outputs
    cols = tl.program_id(0) * BM + tl.arange(0, BM)
    cc = tl.arange(0, BC)
    acc_v = tl.zeros([BM], OutVec.dtype.element_ty)
    acc_m = tl.zeros([BM, BC], OutVec.dtype.element_ty)
    for i0 in range(z * chunk, tl.minimum(z * chunk + chunk, n), BN):
        rows = i0 + tl.arange(0, BN)
        K, _, _ = _tile(X, Y, Mx, s, s % heads, rows, cols, n, m, dp,
                        BD, PREC, True)
        vec = tl.load(Vec + s * n + rows, mask=rows < n, other=0.)
        acc_v += tl.sum(K * vec[:, None], axis=0)
        if HAS_MAT:
            mat = tl.load(Mat + (s * n + rows[:, None]) * c + cc[None, :],
                          mask=(rows[:, None] < n) & (cc[None, :] < c),
                          other=0.)
            acc_m += tl.dot(tl.trans(K), mat, input_precision=PREC)
    tl.store(OutVec + out * m + cols, acc_v, mask=cols < m)
    if HAS_MAT:
        tl.store(OutMat + (out * m + cols[:, None]) * c + cc[None, :],
                 acc_m, mask=(cols[:, None] < m) & (cc[None, :] < c))


@triton.jit
def _grad_tile(X, Y, Mx, U, V, s, h, rows, cols, n, m, dp, r,
               BD: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):
    """dL/dlogK on a tile: K * (U V^T) where K is not clamped.  U V^T runs
    over r (2d + 3 + 2T) in chunks of BR: whole rows of U and V would take
    more shared memory than a GPU has once d reaches 32-64."""
    K, _, live = _tile(X, Y, Mx, s, h, rows, cols, n, m, dp, BD, PREC,
                       True)
    gk = tl.zeros(K.shape, K.dtype)
    for r0 in range(0, r, BR):
        rr = r0 + tl.arange(0, BR)
        u = tl.load(U + (s * n + rows[:, None]) * r + rr[None, :],
                    mask=(rows[:, None] < n) & (rr[None, :] < r), other=0.)
        v = tl.load(V + (s * m + cols[:, None]) * r + rr[None, :],
                    mask=(cols[:, None] < m) & (rr[None, :] < r), other=0.)
        gk += tl.dot(u, tl.trans(v), input_precision=PREC)
    return tl.where(live, K * gk, 0.)


@triton.jit
def _grad_rows(X, Y, Mx, U, V, GX, n, m, dp, r, heads, BN: tl.constexpr,
               BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
               PREC: tl.constexpr):
    """GX_i = sum_j G_ij Y_j (dL/dqf)."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    h = s % heads
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    acc = tl.zeros([BN, BD], GX.dtype.element_ty)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        g = _grad_tile(X, Y, Mx, U, V, s, h, rows, cols, n, m, dp, r, BD,
                       BR, PREC)
        y = tl.load(Y + (h * m + cols[:, None]) * dp + dd[None, :],
                    mask=(cols[:, None] < m) & (dd[None, :] < dp),
                    other=0.)
        acc += tl.dot(g, y, input_precision=PREC)
    tl.store(GX + (s * n + rows[:, None]) * dp + dd[None, :], acc,
             mask=(rows[:, None] < n) & (dd[None, :] < dp))


@triton.jit
def _grad_cols(X, Y, Mx, U, V, GY, n, m, dp, r, heads, chunk,
               BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
               BR: tl.constexpr, PREC: tl.constexpr):
    """Partial GY_j = sum_i G_ij X_i (dL/drf, per slice) over row chunk z
    into GY (Z, S, m, dp), as in ``_col_pass``."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    z = tl.program_id(2).to(tl.int64)
    out = z * tl.num_programs(1) + s
    cols = tl.program_id(0) * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    acc = tl.zeros([BM, BD], GY.dtype.element_ty)
    for i0 in range(z * chunk, tl.minimum(z * chunk + chunk, n), BN):
        rows = i0 + tl.arange(0, BN)
        g = _grad_tile(X, Y, Mx, U, V, s, s % heads, rows, cols, n, m,
                       dp, r, BD, BR, PREC)
        x = tl.load(X + (s * n + rows[:, None]) * dp + dd[None, :],
                    mask=(rows[:, None] < n) & (dd[None, :] < dp),
                    other=0.)
        acc += tl.dot(tl.trans(g), x, input_precision=PREC)
    tl.store(GY + (out * m + cols[:, None]) * dp + dd[None, :], acc,
             mask=(cols[:, None] < m) & (dd[None, :] < dp))
