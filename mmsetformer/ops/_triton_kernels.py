"""Triton kernels of ``fused_triton`` (imported on first use: Triton resolves
the helpers a kernel calls among this module's globals).

Each program owns a block of rows (tokens) or columns (references) and
sweeps the other side, as flash attention does: its own block's features,
row maxima and gradient factors are loaded once, before the sweep.

Where the caller keeps the kernel (``KEPT``: it fits its memory budget),
``_build`` writes ``K`` once, (S, n, m), and every later pass loads its
tiles instead of rebuilding them: a load of 4 bytes per entry against a
dot over d and an exp.  ``_grad_rows`` then turns it into dL/dlogK in
place, whose products with the features are two batched GEMMs.

A tile's logits are ``x_i . y_j`` (one ``tl.dot`` over the head dim d) plus
``KP`` rank-1 terms ``tp_il rp_jl`` of the positional encoding, added
element-wise: folded into the dot they would pad d + KP (32 + 4 for
SeTformer) to the next power of two, doubling the dot and its registers."""
import math

import triton
import triton.language as tl

from .set_attention import LOG_KERNEL_FLOOR

FLOOR: tl.constexpr = tl.constexpr(float(LOG_KERNEL_FLOOR))
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
FLOOR2: tl.constexpr = tl.constexpr(FLOOR.value * LOG2E.value)  # base 2
# A kept kernel's clamped entries hold exp(-FLOOR) (up to exp's rounding);
# above this they are live (pass gradient), as ``K > floor`` in the
# reference's backward
LIVE_ABOVE: tl.constexpr = tl.constexpr(
    math.exp(-LOG_KERNEL_FLOOR) * (1 + 2**-16))


@triton.jit
def _load(P, s, idx, size, width, BW: tl.constexpr):
    """Rows ``idx`` of the (., size, width) array P at slice s: (len, BW),
    zero beyond ``size`` rows and ``width`` columns."""
    ww = tl.arange(0, BW)
    return tl.load(P + (s * size + idx[:, None]) * width + ww[None, :],
                   mask=(idx[:, None] < size) & (ww[None, :] < width),
                   other=0.)


@triton.jit
def _tile(P, s, rows, cols, n, m):
    """Tile (rows, cols) of the (S, n, m) array P at slice s, zero outside
    the n x m entries."""
    return tl.load(P + (s * n + rows[:, None]) * m + cols[None, :],
                   mask=(rows[:, None] < n) & (cols[None, :] < m), other=0.)


@triton.jit
def _store_tile(P, s, rows, cols, n, m, tile):
    tl.store(P + (s * n + rows[:, None]) * m + cols[None, :], tile,
             mask=(rows[:, None] < n) & (cols[None, :] < m))


@triton.jit
def _logits(x, y, TP, RP, hs, rows, cols, n, m, KP: tl.constexpr,
            PREC: tl.constexpr):
    """log K + M on a tile: x (rows) . y (cols) + TP[rows] . RP[hs, cols]
    (TP: (n, KP) token, RP: (H, m, KP) reference position features)."""
    logits = tl.dot(x, tl.trans(y), input_precision=PREC)
    for f in tl.static_range(KP):
        tp = tl.load(TP + rows * KP + f, mask=rows < n, other=0.)
        rp = tl.load(RP + (hs * m + cols) * KP + f, mask=cols < m, other=0.)
        logits += tp[:, None] * rp[None, :]
    return logits


@triton.jit
def _kernel(logits, mx):
    """K on a tile from its logits and row maxima mx, and the mask of the
    entries above the floor (the rest pass no gradient).

    Entries outside the n x m kernel are not masked: the kernels load zero
    features there, so they are finite (the clamp at 0 keeps them so where
    a row's max is below -88), and every product with them meets a
    zero-padded operand.  In fp32 the shift and exp's scaling to base 2 are
    one FMA (``tl.exp`` would multiply after the subtraction); fp64 keeps
    ``tl.exp``, since a float literal is an fp32 constant in Triton."""
    if logits.dtype == tl.float64:
        shifted = logits - mx[:, None]
        return tl.exp(tl.minimum(tl.maximum(shifted, -FLOOR), 0.)), \
            shifted > -FLOOR
    shifted = logits * LOG2E - (mx * LOG2E)[:, None]
    return tl.exp2(tl.minimum(tl.maximum(shifted, -FLOOR2), 0.)), \
        shifted > -FLOOR2


@triton.jit
def _build(X, Y, TP, RP, Mx, Kp, n, m, d, heads, KP: tl.constexpr,
           BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
           PREC: tl.constexpr, FIND_MAX: tl.constexpr, STORE: tl.constexpr):
    """The row maxima of the logits into Mx (FIND_MAX; else Mx holds them)
    and, with STORE, K (S, n, m) into Kp.  (The floor needs the final max,
    so the max is not an online one: K is built in a second sweep.)"""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    x = _load(X, s, rows, n, d, BD)
    if FIND_MAX:
        mx = tl.full([BN], float('-inf'), Mx.dtype.element_ty)
        for j0 in range(0, m, BM):
            cols = j0 + tl.arange(0, BM)
            logits = _logits(x, _load(Y, s % heads, cols, m, d, BD), TP, RP,
                             s % heads, rows, cols, n, m, KP, PREC)
            logits = tl.where(cols[None, :] < m, logits, float('-inf'))
            mx = tl.maximum(mx, tl.max(logits, axis=1))
        tl.store(Mx + s * n + rows, mx, mask=rows < n)
    else:
        mx = tl.load(Mx + s * n + rows, mask=rows < n, other=0.)
    if STORE:
        for j0 in range(0, m, BM):
            cols = j0 + tl.arange(0, BM)
            K, _ = _kernel(_logits(x, _load(Y, s % heads, cols, m, d, BD),
                                   TP, RP, s % heads, rows, cols, n, m, KP,
                                   PREC), mx)
            _store_tile(Kp, s, rows, cols, n, m, K)


@triton.jit
def _row_pass(X, Y, TP, RP, Mx, Kp, Vec, Mat, OutVec, OutMat, n, m, d, c,
              heads, KP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
              BD: tl.constexpr, BC: tl.constexpr, HAS_MAT: tl.constexpr,
              PREC: tl.constexpr, KEPT: tl.constexpr):
    """OutVec = K Vec, OutMat = K Mat (Vec: (S, m), Mat: (S, m, c))."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    if not KEPT:
        x = _load(X, s, rows, n, d, BD)
        mx = tl.load(Mx + s * n + rows, mask=rows < n, other=0.)
    # the tiles' products, summed over their columns once after the loop
    # (as _col_pass sums over rows): a sum per tile crosses lanes
    acc_v = tl.zeros([BN, BM], OutVec.dtype.element_ty)
    acc_m = tl.zeros([BN, BC], OutVec.dtype.element_ty)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        if KEPT:
            K = _tile(Kp, s, rows, cols, n, m)
        else:
            K, _ = _kernel(_logits(x, _load(Y, s % heads, cols, m, d, BD),
                                   TP, RP, s % heads, rows, cols, n, m, KP,
                                   PREC), mx)
        vec = tl.load(Vec + s * m + cols, mask=cols < m, other=0.)
        if HAS_MAT:
            acc_m += tl.dot(K, _load(Mat, s, cols, m, c, BC),
                            input_precision=PREC)
            if KEPT:
                # again, from the cache: one loaded tile feeding both the
                # dot and the element-wise product takes a layout that
                # fills the registers (255 and spills on sm_90, 76 so)
                K = _tile(Kp, s, rows, cols, n, m)
        acc_v += K * vec[None, :]
    tl.store(OutVec + s * n + rows, tl.sum(acc_v, axis=1), mask=rows < n)
    if HAS_MAT:
        cc = tl.arange(0, BC)
        tl.store(OutMat + (s * n + rows[:, None]) * c + cc[None, :],
                 acc_m, mask=(rows[:, None] < n) & (cc[None, :] < c))


@triton.jit
def _step_pass(Kp, Vec, Consts, A, U, OutRow, OutA, OutCol, n, m,
               BN: tl.constexpr, BM: tl.constexpr, GRAD: tl.constexpr):
    """One Sinkhorn step over the kept K, read once per row block (the
    row pass and the column pass that follows it, fused): r = K Vec on
    the program's rows, then its guarded division (``set_attention.
    _safe_div`` / ``_safe_div_grad``), then that vector's products with
    the same rows of K, the block's partial K^T sums into OutCol (Z row
    blocks, S, m), which the caller sums (no atomics).  Consts: (tiny,
    1 / n) in the kernel's dtype.
      forward: u = r, a = 1/(n u) (0 where u <= tiny) into OutRow, OutA;
      GRAD (of a step: A = a_t, U = u_t): gu = -r a_t / u_t (0 there)
      into OutRow."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    z = tl.program_id(0).to(tl.int64)
    rows = z * BN + tl.arange(0, BN)
    live = rows < n
    acc = tl.zeros([BN, BM], OutRow.dtype.element_ty)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        vec = tl.load(Vec + s * m + cols, mask=cols < m, other=0.)
        acc += _tile(Kp, s, rows, cols, n, m) * vec[None, :]
    r = tl.sum(acc, axis=1)
    tiny = tl.load(Consts)
    if GRAD:
        a_t = tl.load(A + s * n + rows, mask=live, other=0.)
        u_t = tl.load(U + s * n + rows, mask=live, other=1.)
        ok = u_t > tiny
        w = tl.where(ok, -r * a_t / tl.where(ok, u_t, 1.), 0.)
    else:
        w = tl.load(Consts + 1) / tl.where(r > tiny, r, float('inf'))
        tl.store(OutA + s * n + rows, w, mask=live)
    tl.store(OutRow + s * n + rows, w if GRAD else r, mask=live)
    # the same tiles again (this program read them last: from the cache)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        K = _tile(Kp, s, rows, cols, n, m)
        tl.store(OutCol + (z * tl.num_programs(1) + s) * m + cols,
                 tl.sum(K * w[:, None], axis=0), mask=cols < m)


@triton.jit
def _col_pass(X, Y, TP, RP, Mx, Kp, Vec, Mat, OutVec, OutMat, n, m, d, c,
              heads, chunk, KP: tl.constexpr, BN: tl.constexpr,
              BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
              HAS_MAT: tl.constexpr, PREC: tl.constexpr, KEPT: tl.constexpr):
    """Partial OutVec = K^T Vec, OutMat = K^T Mat (Vec: (S, n), Mat: (S, n,
    c)) over row chunk z (program axis 2) into OutVec (Z, S, m), OutMat (Z,
    S, m, c): the caller sums over Z, so a few column blocks still fill the
    GPU and the result does not depend on scheduling (no atomics)."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    z = tl.program_id(2).to(tl.int64)
    out = z * tl.num_programs(1) + s  # (z, s) row of the partial outputs
    cols = tl.program_id(0) * BM + tl.arange(0, BM)
    if not KEPT:
        y = _load(Y, s % heads, cols, m, d, BD)
    # the tiles' products, summed over their rows once after the loop: a
    # sum over rows per tile crosses warps (shuffles and barriers per tile)
    acc_v = tl.zeros([BN, BM], OutVec.dtype.element_ty)
    acc_m = tl.zeros([BM, BC], OutVec.dtype.element_ty)
    for i0 in range(z * chunk, tl.minimum(z * chunk + chunk, n), BN):
        rows = i0 + tl.arange(0, BN)
        if KEPT:
            K = _tile(Kp, s, rows, cols, n, m)
        else:
            mx = tl.load(Mx + s * n + rows, mask=rows < n, other=0.)
            K, _ = _kernel(_logits(_load(X, s, rows, n, d, BD), y, TP, RP,
                                   s % heads, rows, cols, n, m, KP, PREC),
                           mx)
        vec = tl.load(Vec + s * n + rows, mask=rows < n, other=0.)
        acc_v += K * vec[:, None]
        if HAS_MAT:
            acc_m += tl.dot(tl.trans(K), _load(Mat, s, rows, n, c, BC),
                            input_precision=PREC)
    tl.store(OutVec + out * m + cols, tl.sum(acc_v, axis=0), mask=cols < m)
    if HAS_MAT:
        cc = tl.arange(0, BC)
        tl.store(OutMat + (out * m + cols[:, None]) * c + cc[None, :],
                 acc_m, mask=(cols[:, None] < m) & (cc[None, :] < c))


@triton.jit
def _grad_tile(K, live, U, V, s, rows, cols, n, m, r, BR: tl.constexpr,
               PREC: tl.constexpr):
    """dL/dlogK on a tile: K * (U V^T) where K is not clamped.  U V^T runs
    over r (2d + 3 + 2T) in chunks of BR: whole rows of U and V would take
    more registers than a GPU has once d reaches 32-64."""
    K = tl.where(live, K, 0.)  # (the mask dies here, before the loop)
    gk = tl.zeros(K.shape, K.dtype)
    for r0 in range(0, r, BR):
        rr = r0 + tl.arange(0, BR)
        u = tl.load(U + (s * n + rows[:, None]) * r + rr[None, :],
                    mask=(rows[:, None] < n) & (rr[None, :] < r), other=0.)
        v = tl.load(V + (s * m + cols[:, None]) * r + rr[None, :],
                    mask=(cols[:, None] < m) & (rr[None, :] < r), other=0.)
        gk += tl.dot(u, tl.trans(v), input_precision=PREC)
    return K * gk


@triton.jit
def _grad_rows(X, Y, TP, RP, Mx, Kp, U, V, GX, n, m, d, r, heads,
               KP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
               BD: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
               KEPT: tl.constexpr):
    """GX_i = sum_j G_ij Y_j (dL/dx; the token positions are constants);
    KEPT: G = dL/dlogK instead, in place of the kept kernel (the caller
    multiplies it out)."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    if not KEPT:
        x = _load(X, s, rows, n, d, BD)
        mx = tl.load(Mx + s * n + rows, mask=rows < n, other=0.)
        acc = tl.zeros([BN, BD], GX.dtype.element_ty)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        if KEPT:  # (each tile is this program's alone)
            K = _tile(Kp, s, rows, cols, n, m)
            g = _grad_tile(K, K > LIVE_ABOVE, U, V, s, rows, cols, n, m, r,
                           BR, PREC)
            _store_tile(Kp, s, rows, cols, n, m, g)
        else:
            y = _load(Y, s % heads, cols, m, d, BD)
            K, live = _kernel(_logits(x, y, TP, RP, s % heads, rows, cols,
                                      n, m, KP, PREC), mx)
            g = _grad_tile(K, live, U, V, s, rows, cols, n, m, r, BR, PREC)
            acc += tl.dot(g, y, input_precision=PREC)
    if not KEPT:
        dd = tl.arange(0, BD)
        tl.store(GX + (s * n + rows[:, None]) * d + dd[None, :], acc,
                 mask=(rows[:, None] < n) & (dd[None, :] < d))


@triton.jit
def _grad_cols(X, Y, TP, RP, Mx, U, V, GY, GP, n, m, d, r, heads, chunk,
               KP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
               BD: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
               POS_GRAD: tl.constexpr, PREC: tl.constexpr):
    """Partial GY_j = sum_i G_ij X_i (dL/dy, per slice) over row chunk z
    into GY (Z, S, m, d), as in ``_col_pass``; with POS_GRAD also
    GP_j = sum_i G_ij TP_i (dL/dRP) into GP (Z, S, m, KP)."""
    s = tl.program_id(1).to(tl.int64)  # 64-bit offsets
    z = tl.program_id(2).to(tl.int64)
    out = z * tl.num_programs(1) + s
    cols = tl.program_id(0) * BM + tl.arange(0, BM)
    y = _load(Y, s % heads, cols, m, d, BD)
    acc = tl.zeros([BM, BD], GY.dtype.element_ty)
    acc_p = tl.zeros([BM, BP], GY.dtype.element_ty)
    for i0 in range(z * chunk, tl.minimum(z * chunk + chunk, n), BN):
        rows = i0 + tl.arange(0, BN)
        x = _load(X, s, rows, n, d, BD)
        mx = tl.load(Mx + s * n + rows, mask=rows < n, other=0.)
        K, live = _kernel(_logits(x, y, TP, RP, s % heads, rows, cols, n, m,
                                  KP, PREC), mx)
        g = _grad_tile(K, live, U, V, s, rows, cols, n, m, r, BR, PREC)
        acc += tl.dot(tl.trans(g), x, input_precision=PREC)
        if POS_GRAD:  # KP column sums: a dot would pad KP to 16
            for f in tl.static_range(KP):
                tp = tl.load(TP + rows * KP + f, mask=rows < n, other=0.)
                acc_p += tl.where(tl.arange(0, BP)[None, :] == f, tl.sum(
                    g * tp[:, None], axis=0)[:, None], 0.)
    dd = tl.arange(0, BD)
    tl.store(GY + (out * m + cols[:, None]) * d + dd[None, :], acc,
             mask=(cols[:, None] < m) & (dd[None, :] < d))
    if POS_GRAD:
        pp = tl.arange(0, BP)
        tl.store(GP + (out * m + cols[:, None]) * KP + pp[None, :], acc_p,
                 mask=(cols[:, None] < m) & (pp[None, :] < KP))
