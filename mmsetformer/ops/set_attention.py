"""SeT: Self-optimal Transport attention (torch only).

Per head, n tokens are matched to m references by an entropic optimal
transport plan ``P = diag(a) K diag(b)`` (Sinkhorn) over the Gibbs kernel

    log K_ij = (cos(q_i, r_j) - 1) / eps - ||p_i - pbar_j||^2 / sigma^2,

values are aggregated into the m reference cells (``z = D_c^-1 P^T v``) and
redistributed to the tokens (``y = D_r^-1 P z``).  ``A = D_r^-1 P D_c^-1 P^T``
is never built: the only n x m tensor is ``K``, built once and reused by every
Sinkhorn iteration, so time is O(n m (d + T)) and memory O(n m) per head.

``_SeTFunction`` is the reference implementation, one autograd function:
its forward builds ``K`` in place and its backward collects every gradient
that reaches ``K`` (one rank-1 term per Sinkhorn matrix-vector product, one
rank-(d+1) term per aggregation) into one low-rank product, applied a block
of rows at a time, so the backward allocates no n x m tensor at all.

Fused implementations compute the same function and the same gradients:
the compiled CPU kernel (``fused_cpu``) and the Triton kernels for CUDA
(``fused_triton``), each a pair of ``torch.library`` operators
(:class:`FusedImplementation`) that torch.compile keeps in its graphs.
:func:`set_attention` picks one in :func:`_implementation`, the only place
that chooses (on CUDA by timing
the reference against the Triton kernels once per size class,
:func:`fastest`); :func:`set_backend` (or ``MMSETFORMER_SET_BACKEND``)
forces one.
"""
import contextlib
import math
import os
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    'set_attention', 'transport_plan', 'grid_positions', 'reference_grid',
    'sinkhorn_scalings', 'gibbs_kernel', 'kernel_workspace', 'set_backend',
    'get_backend', 'measured_choices', 'BACKENDS', 'shared_grid_positions'
]

# Guards the norms of the cosine (so zero vectors are safe).
NORM_DELTA = 1e-6
# Kernel floor, relative to each row's max: exp(-30) ~ 1e-13. Below it an
# entry is numerically irrelevant, but a column made only of such entries
# needs a scaling b ~ 1/K that overflows fp32 in the backward pass (its
# gradient carries b^2); the floor keeps b, and the gradients, finite.
LOG_KERNEL_FLOOR = 30.0
# On the CPU, a loop of matrix-vector products beats one batched matmul with
# a single column for large kernels (BLAS gemv vs a gemm path); for many
# small ones the loop's per-call overhead wins.
_MV_LOOP_MIN_SIZE = 1 << 18
# Elements of dL/dK computed at a time in the backward pass: 8 MB in fp32 on
# the CPU (cache-sized); on GPUs, whose caching allocator makes fresh buffers
# cheap, blocks large enough to keep kernel launches few.
_GRAD_BLOCK_ELEMS = 1 << 21
_GRAD_BLOCK_ELEMS_GPU = 1 << 26
# Whether the reference keeps K from its forward for the backward ('1'),
# or rebuilds it there ('0': one more product and exp per layer, and no
# B*h*n*m tensor alive between a layer's forward and its backward);
# 'auto' rebuilds it on GPUs, where memory, not the product, is what runs
# out (SeTformer-T at 800 x 1344, batch 2: ~8 GB of kernels kept
# otherwise).
KEEP_KERNEL = os.environ.get('MMSETFORMER_SET_KEEP_KERNEL', 'auto')

Pos = Tuple[Tensor, Tensor]


def grid_positions(h: int, w: int, device=None,
                   dtype=torch.float32) -> Tensor:
    """Normalised cell centres of an ``h x w`` grid, row-major: (h*w, 2)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), -1).view(-1, 2)


def reference_grid(num_refs: int) -> Tuple[int, int]:
    """The most square ``(g_h, g_w)`` with ``g_h * g_w == num_refs``."""
    if num_refs < 1:
        raise ValueError(f'num_refs must be >= 1, got {num_refs}')
    g_h = max(d for d in range(1, int(num_refs**0.5) + 1) if num_refs % d == 0)
    return g_h, num_refs // g_h


def _compute_dtype(x: Tensor) -> torch.dtype:
    # fp32 at least (also under autocast); float64 stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def _unit(x: Tensor) -> Tensor:
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + NORM_DELTA)


def _check(q: Tensor, refs: Tensor, eps: float, num_iters: int,
           pos: Optional[Pos], sigma: Optional[float]) -> None:
    if q.dim() != 4:
        raise ValueError(f'q must be (B, heads, n, d), got {tuple(q.shape)}')
    if refs.dim() != 3 or refs.shape[0] != q.shape[1] \
            or refs.shape[2] != q.shape[3]:
        raise ValueError(f'refs must be (heads={q.shape[1]}, m, '
                         f'd={q.shape[3]}), got {tuple(refs.shape)}')
    if not eps > 0:
        raise ValueError(f'eps must be > 0, got {eps}')
    if num_iters < 0:
        raise ValueError(f'num_iters must be >= 0, got {num_iters}')
    if pos is not None:
        if sigma is None or not sigma > 0:
            raise ValueError(f'sigma must be > 0 with positions, got {sigma}')
        tok, ref = pos
        if tok.shape[0] != q.shape[2] or ref.shape[0] != refs.shape[1] \
                or tok.shape[1] != ref.shape[1]:
            raise ValueError(
                f'pos must be (token_pos (n={q.shape[2]}, k), ref_pos '
                f'(m={refs.shape[1]}, k)), got {tuple(tok.shape)} and '
                f'{tuple(ref.shape)}')


# -- the kernel ---------------------------------------------------------------
def _features(q: Tensor, refs: Tensor, eps: float, pos: Optional[Pos],
              sigma: Optional[float]) -> Tuple[Tensor, Tensor]:
    """Features with ``log K = qf rf^T`` (+ const): (B,h,n,d') (1,h,m,d').

    The LPE penalty ``||p_i - pbar_j||^2 / sigma^2`` expands into an inner
    product of (k + 2)-dim position features, ``-||t - r||^2 = [-|t|^2, 2t,
    1] . [1, r, -|r|^2]``, so it joins the cosine in one matmul instead of an
    extra n x m pass.
    """
    dtype = _compute_dtype(q)
    qf = _unit(q.to(dtype)) / eps
    tok_f, rf = _ref_features(refs, pos, sigma, dtype, q.device)
    if tok_f is not None:
        b, h, n, _ = qf.shape
        qf = torch.cat([qf, tok_f.expand(b, h, n, -1)], -1)
    return qf, rf


def _ref_features(refs: Tensor, pos: Optional[Pos], sigma: Optional[float],
                  dtype: torch.dtype,
                  device) -> Tuple[Optional[Tensor], Tensor]:
    """The references' features rf (1, h, m, d') of :func:`_features` and
    the tokens' position features (n, k) that complete ``qf`` (None
    without LPE)."""
    rf = _unit(refs.to(dtype)).unsqueeze(0)
    if pos is None:
        return None, rf
    tok_f, ref_f = _memo(('lpe', float(sigma), dtype, str(device)),
                         lambda: _position_features(pos, sigma, dtype,
                                                    device), *pos)
    return tok_f, torch.cat([rf, ref_f.expand(1, rf.shape[1], -1, -1)], -1)


def _position_features(pos: Pos, sigma: float, dtype: torch.dtype,
                       device) -> Tuple[Tensor, Tensor]:
    """The LPE's factors of :func:`_features`: token (n, k + 2) and
    reference (m, k + 2) position features."""
    tok, ref = (p.to(device=device, dtype=dtype) for p in pos)
    s2 = float(sigma)**2
    tok_f = torch.cat([-(tok * tok).sum(-1, keepdim=True), 2 * tok,
                       tok.new_ones(tok.shape[0], 1)], -1) / s2
    ref_f = torch.cat([ref.new_ones(ref.shape[0], 1), ref,
                       -(ref * ref).sum(-1, keepdim=True)], -1)
    return tok_f, ref_f


class _Workspace(threading.local):
    depth = 0
    buf: Optional[Tensor] = None
    memo: Optional[dict] = None  # see _memo


_WORKSPACE = _Workspace()


@contextlib.contextmanager
def kernel_workspace():
    """Let the SeT calls inside share one kernel buffer and the position
    features they have in common, freed on exit.

    On the CPU a fresh n x m kernel costs more than the matrix product that
    fills it: its pages are faulted in on first touch (~3x the product's
    time at n = 67200, m = 750). Inside this context, calls whose kernel is
    not kept for a backward pass (inference, frozen layers) write it into
    one buffer sized for the largest. ``SeTformer.forward`` runs in one.
    (This is the reference's; the compiled CPU kernel keeps its scratch
    buffer between calls itself, see ``fused_cpu.CACHE_BYTES``.)
    The layers of a stage also share their token and reference positions
    and the LPE features built from them (:func:`shared_grid_positions`,
    :func:`_memo`): built once per shape, not once per layer.
    """
    _WORKSPACE.depth += 1
    if _WORKSPACE.depth == 1:
        _WORKSPACE.memo = {}
    try:
        yield
    finally:
        _WORKSPACE.depth -= 1
        if not _WORKSPACE.depth:
            _WORKSPACE.buf = _WORKSPACE.memo = None


def _memo(key: tuple, make: Callable, *tensors: Tensor):
    """``make()``, once per ``key`` and ``tensors`` (its tensor inputs, by
    identity and version) inside :func:`kernel_workspace`, else on every
    call. Each of these small results costs a dozen kernel launches, which
    a forward pass of SeTformer-T would repeat in all of its 30 layers.
    Not while tracing or under a dispatch mode (they record the ops), nor
    for inputs that take gradients."""
    memo = _WORKSPACE.memo
    if memo is None or torch.jit.is_tracing() \
            or torch.compiler.is_compiling() \
            or _get_current_dispatch_mode() is not None or (
                torch.is_grad_enabled() and
                any(t.requires_grad for t in tensors)):
        return make()
    key = (key, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
           *((id(t), -1 if t.is_inference() else t._version)
             for t in tensors))
    if key not in memo:  # (it holds the tensors: their ids stay theirs)
        memo[key] = (tensors, make())
    return memo[key][1]


def shared_grid_positions(h: int, w: int, device=None) -> Tensor:
    """:func:`grid_positions` (fp32), shared by the calls inside one
    :func:`kernel_workspace` (the same tensor for the same grid: do not
    modify it)."""
    return _memo(('grid', h, w, str(device)),
                 lambda: grid_positions(h, w, device=device))


def _workspace(shape, dtype: torch.dtype, device) -> Optional[Tensor]:
    """A (shape) view of the active workspace, or None outside one."""
    # tracers (jit, as the FLOP counter uses, and dynamo) record no out=
    if not _WORKSPACE.depth or torch.jit.is_tracing() \
            or torch.compiler.is_compiling():
        return None
    numel, buf = math.prod(shape), _WORKSPACE.buf
    if buf is None or buf.numel() < numel or buf.dtype != dtype \
            or buf.device != device:
        _WORKSPACE.buf = None  # release the old one before allocating
        buf = _WORKSPACE.buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _kernel(qf: Tensor, rf: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``exp(max(qf rf^T - rowmax, -floor))``, in place when not recording
    gradients (one n x m buffer, ``out`` if given, no temporaries)."""
    logits = torch.matmul(qf, rf.transpose(-1, -2), out=out)
    # P, and everything computed from it, is invariant to a per-row shift of
    # log K (the row scaling absorbs it), so the max needs no gradient.
    rowmax = logits.amax(-1, keepdim=True).detach()
    if not logits.requires_grad:
        return logits.sub_(rowmax).clamp_(min=-LOG_KERNEL_FLOOR).exp_()
    return (logits - rowmax).clamp(min=-LOG_KERNEL_FLOOR).exp()


def gibbs_kernel(q: Tensor,
                 refs: Tensor,
                 eps: float,
                 pos: Optional[Pos] = None,
                 sigma: Optional[float] = None) -> Tensor:
    """Row-max stabilised Gibbs kernel ``K``: (B, h, n, m), >= fp32, with
    entries in [exp(-LOG_KERNEL_FLOOR), 1]."""
    return _kernel(*_features(q, refs, eps, pos, sigma))


# -- products with the kernel -------------------------------------------------
def _Kx(K: Tensor, x: Tensor) -> Tensor:
    """K x: (..., n, m) @ (..., m) -> (..., n)."""
    if K.device.type == 'cpu' and K.shape[-2] * K.shape[-1] >= \
            _MV_LOOP_MIN_SIZE:
        Kf, xf = K.reshape(-1, *K.shape[-2:]), x.reshape(-1, x.shape[-1])
        return torch.stack([torch.mv(k, v) for k, v in zip(Kf, xf)]).view(
            K.shape[:-1])
    return torch.matmul(K, x.unsqueeze(-1)).squeeze(-1)


def _xK(x: Tensor, K: Tensor) -> Tensor:
    """K^T x: (..., n) -> (..., m), as a row vector times K (reads K in its
    memory order, unlike a product with the transposed view)."""
    return torch.matmul(x.unsqueeze(-2), K).squeeze(-2)


def _XK(X: Tensor, K: Tensor) -> Tensor:
    """K^T X: (..., n, c) -> (..., m, c), as (X^T K)^T for the same reason."""
    return torch.matmul(X.transpose(-1, -2), K).transpose(-1, -2)


def heads_last(y: Tensor) -> Tensor:
    """y (B, h, n, d), stored as (B, n, h, d): the layout in which a layer
    concatenates its heads.  Every implementation returns y so: the layer's
    ``y.transpose(1, 2).reshape(B, n, h * d)`` is then a view, and its output
    projection saves for its backward the tensor that SeT saved for its own,
    not a copy of it (one n x C tensor less per layer in training)."""
    return y.transpose(1, 2).contiguous().transpose(1, 2)


def _safe_div(num, den: Tensor) -> Tensor:
    """num / den, and 0 where den underflowed (< smallest normal float).

    A reference whose kernel column underflowed receives no mass whatever
    its scaling, so 0 is as good as the undefined 1/0 and keeps the other
    scalings' range intact. Dividing by inf there gives that 0 and keeps
    inf out of the backward pass too (grad of num/den: -num/den^2 = 0 at
    den = inf, none through the guarded den), in one kernel fewer than a
    ``where`` on the quotient."""
    return num / torch.where(den > torch.finfo(den.dtype).tiny, den,
                             math.inf)


def _safe_div_grad(g: Tensor, out: Tensor, den: Tensor) -> Tensor:
    """Gradient w.r.t. ``den`` of ``out = num / den`` (0 where guarded)."""
    ok = den > torch.finfo(den.dtype).tiny
    return torch.where(ok, -g * out / torch.where(ok, den, 1.), 0.)


@contextlib.contextmanager
def module_setting(namespace: dict, name: str, value: int):
    """Inside, ``namespace[name]`` (a module's setting) is ``int(value)``."""
    old = namespace[name]
    namespace[name] = int(value)
    try:
        yield
    finally:
        namespace[name] = old


# The fused kernels work on slices: (B*h, n, .) tokens, (h, m, d')
# references; they share their operators' autograd.
class FusedImplementation:
    """A fused implementation of SeT made of two ``torch.library``
    operators, which torch.compile keeps in its graphs (an
    autograd.Function calling compiled code would be opaque to it), with
    their autograd:

    - ``forward_op(q, tok, rf3, v, eps, T, *extra()) -> [y, *saved]``: q, v
      (B, h, n, d) with rows of unit stride, the token positions' features
      tok (n, k), the references' rf3 (h, m, d + k); y (B, h, n, d) stored
      as :func:`heads_last` says, ``saved`` per slice (S = B*h).  The
      kernels build the queries' features themselves;
    - ``backward_op(q, tok, rf3, v, [y, *saved], gy, need_q, need_rf, eps,
      *extra) -> [gq (S, n, d), grf (S, m, d + k) per slice, gv]``, an
      empty tensor for a gradient not needed; gy (B, h, n, d) with rows of
      unit stride (as the layer's output projection hands it back, in y's
      layout).

    The token positions get no gradient (they are constants of the map).
    """

    def __init__(self, backend: str, forward_op, backward_op,
                 extra: Callable[[], tuple] = tuple):
        self.backend = backend  # (its name in set_backend)
        self.forward_op, self.extra = forward_op, extra

        def setup_context(ctx, inputs, output):
            q, tok, rf3, v, eps, _, *extra = inputs
            ctx.save_for_backward(q, tok, rf3, v, *output)
            ctx.args = (eps, *extra)
            # only y leaves the operator: no zero gradients for the saved
            # outputs (one fill kernel each per layer's backward)
            ctx.set_materialize_grads(False)

        def backward(ctx, grads):
            q, tok, rf3, v, *fwd = ctx.saved_tensors
            need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
            # (grads[1:], of the saved outputs, are None; grads[0] too
            # where the caller passes an undefined one, as gradcheck does)
            if grads[0] is None:
                return (None, ) * (6 + len(ctx.args) - 1)
            gy = grads[0] if grads[0].stride(-1) == 1 else \
                grads[0].contiguous()
            gq, gr, gv = backward_op(q, tok, rf3, v, fwd, gy, need_q, need_r,
                                     *ctx.args)
            B, h, n, _ = q.shape
            return (gq.view(B, h, n, -1) if need_q else None, None,
                    gr.view(B, h, *gr.shape[1:]).sum(0) if need_r else None,
                    gv.view(B, h, n, -1), None, None) + (None, ) * (
                        len(ctx.args) - 1)

        torch.library.register_autograd(forward_op, backward,
                                        setup_context=setup_context)
        backward_op.register_fake(_fused_grads_like)

    def apply(self, q: Tensor, tok: Tensor, rf: Tensor, v: Tensor,
              eps: float, num_iters: int) -> Tensor:
        """y (B, h, n, d) for the references' features rf (1, h, m, d + k).
        q and v may be views (the layer's projection split into heads)."""
        q, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, v))
        rf3 = rf.reshape(v.shape[1], *rf.shape[-2:]).contiguous()
        return self.forward_op(q, tok.contiguous(), rf3, v, eps, num_iters,
                               *self.extra())[0]

    def __repr__(self) -> str:
        return f'<SeT: {self.backend} kernels>'


def _fused_grads_like(q, tok, rf3, v, fwd, gy, need_q, need_r, *args):
    """The shapes of a fused backward's gradients (``FusedImplementation``)."""
    (B, h, n, d), (m, dp) = q.shape, rf3.shape[1:]
    return [q.new_empty((B * h, n, d) if need_q else 0),
            q.new_empty((B * h, m, dp) if need_r else 0),
            q.new_empty(B * h, n, d)]


def sinkhorn_scalings(K: Tensor, num_iters: int,
                      trace: Optional[List] = None) -> Tuple[Tensor, Tensor]:
    """Scalings ``a`` (B, h, n) and ``b`` (B, h, m) of ``P = diag(a) K
    diag(b)``.

    Starts from b = 1 and alternates the row (P1 = 1/n) and column
    (P^T 1 = 1/m) scalings ``num_iters`` times, ending with a row scaling, so
    the rows of P sum to 1/n exactly and its columns approach 1/m. With
    ``trace``, the (b, u = Kb, a, s = K^T a) of every step are appended.
    """
    n, m = K.shape[-2], K.shape[-1]
    b = K.new_ones(K.shape[:-2] + (m, ))
    for _ in range(num_iters):
        u = _Kx(K, b)
        a = _safe_div(1.0 / n, u)
        s = _xK(a, K)
        if trace is not None:
            trace.append((b, u, a, s))
        b = _safe_div(1.0 / m, s)
    u = _Kx(K, b)
    a = _safe_div(1.0 / n, u)
    if trace is not None:
        trace.append((b, u, a, None))
    return a, b


def _keeps_kernel(qf: Tensor) -> bool:
    """Whether the reference saves K for its backward (:data:`KEEP_KERNEL`
    decides)."""
    if KEEP_KERNEL not in ('auto', '0', '1'):
        raise ValueError(f'MMSETFORMER_SET_KEEP_KERNEL must be auto, 0 or 1'
                         f', got {KEEP_KERNEL!r}')
    return KEEP_KERNEL == '1' or (KEEP_KERNEL == 'auto' and
                                  qf.device.type == 'cpu')


def _logit_grads(K: Tensor, U: Tensor, Vt: Tensor, qf: Tensor, rf: Tensor,
                 need_qf: bool, need_rf: bool):
    """Gradients of ``qf`` and ``rf`` from ``dL/dK = U Vt`` (U: (.., n, r),
    Vt: (.., r, m)): through exp (dK/dlogK = K) and the floor clamp (no
    gradient below it), then through ``logK = qf rf^T``.

    ``dL/dK`` is built a block of rows at a time in one small reused buffer,
    never as an n x m tensor: a fresh n x m buffer costs more in page faults
    than the products, and a cache-sized block serves both products hot.
    """
    batch, (n, m) = math.prod(K.shape[:-2]), K.shape[-2:]
    floor = torch.tensor(-LOG_KERNEL_FLOOR, dtype=K.dtype).exp()
    gqf, grf = [], None

    def rows_from(i: int, rows: int, buf: Optional[Tensor]):
        nonlocal grf
        Kb = K[..., i:i + rows, :]
        glog = torch.matmul(U[..., i:i + rows, :], Vt, out=None if buf is None
                            else buf[:Kb.numel()].view(Kb.shape))
        glog.mul_(Kb).masked_fill_(Kb <= floor, 0)
        if need_qf:
            gqf.append(torch.matmul(glog, rf))
        if need_rf:
            g = torch.matmul(qf[..., i:i + rows, :].transpose(-1, -2), glog)
            grf = g if grf is None else grf.add_(g)

    if torch.compiler.is_compiling():
        # one block: a loop over a symbolic n makes dynamo (torch 2.11)
        # specialise n, and the compiler plans its buffers itself
        rows_from(0, n, None)
    else:
        block = _GRAD_BLOCK_ELEMS if K.device.type == 'cpu' \
            else _GRAD_BLOCK_ELEMS_GPU
        rows = max(1, min(n, block // max(1, batch * m)))
        buf = K.new_empty(batch * rows * m)
        for i in range(0, n, rows):
            rows_from(i, rows, buf)
    return (torch.cat(gqf, -2) if need_qf else None,
            grf.transpose(-1, -2).sum(0, keepdim=True) if need_rf else None)


class _SeTFunction(torch.autograd.Function):
    """Kernel + Sinkhorn + aggregation + redistribution with a hand-written
    backward (see the module docstring)."""

    backend = 'reference'  # (its name in set_backend)

    @staticmethod
    def forward(ctx, qf: Tensor, rf: Tensor, v: Tensor, num_iters: int):
        # in place (autograd is off inside forward); a kernel not saved for
        # the backward may live in the shared workspace
        saving = any(ctx.needs_input_grad[:3])
        keep = saving and _keeps_kernel(qf)
        K = _kernel(qf, rf, None if keep else _workspace(
            qf.shape[:-1] + rf.shape[-2:-1], qf.dtype, qf.device))
        trace: List = []
        a, b = sinkhorn_scalings(K, num_iters, trace)
        a_top = a.amax(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        b_top = b.amax(-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
        a_hat, b_hat = a / a_top, b / b_top
        # z_j = sum_i P_ij v_i / sum_i P_ij: one pass over K for both sums
        X4 = torch.cat([a_hat.unsqueeze(-1) * v, a_hat.unsqueeze(-1)], -1)
        Z4 = _XK(X4, K)
        s4 = Z4[..., -1:]
        z = Z4[..., :-1] / s4  # s4 >= exp(-30): K's floor times max(a_hat)
        # y_i = sum_j P_ij z_j / sum_j P_ij
        X5 = torch.cat([b_hat.unsqueeze(-1) * z, b_hat.unsqueeze(-1)], -1)
        Y5 = torch.matmul(K, X5)
        w = Y5[..., -1:]
        y = heads_last(Y5[..., :-1] / w)  # w >= exp(-30) likewise
        if saving:
            flat = [t for step in trace for t in step if t is not None]
            # (rebuilt, the kernel is the same: the same product of the
            # same features)
            ctx.save_for_backward(qf, rf, v, K if keep else None, a_top,
                                  b_top, X4, s4, z, X5, w, y, *flat)
            ctx.num_iters = num_iters
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        qf, rf, v, K, a_top, b_top, X4, s4, z, X5, w, y, *flat = \
            ctx.saved_tensors
        if K is None:
            K = _kernel(qf, rf)
        T = ctx.num_iters
        # factors of dL/dK = U V^T, gathered over every product with K
        left, right = [], []
        # y = Y~ / w with [Y~ | w] = K X5
        gY = gy / w
        G5 = torch.cat([gY, -(gY * y).sum(-1, keepdim=True)], -1)
        left.append(G5)
        right.append(X5)
        gX5 = _XK(G5, K)
        gz = X5[..., -1:] * gX5[..., :-1]
        gb_hat = (z * gX5[..., :-1]).sum(-1) + gX5[..., -1]
        # z = Z~ / s with [Z~ | s] = K^T X4
        gZ = gz / s4
        G4 = torch.cat([gZ, -(gZ * z).sum(-1, keepdim=True)], -1)
        left.append(X4)
        right.append(G4)
        gX4 = torch.matmul(K, G4)
        a_hat = X4[..., -1]
        gv = a_hat.unsqueeze(-1) * gX4[..., :-1]
        ga_hat = (v * gX4[..., :-1]).sum(-1) + gX4[..., -1]
        # the max-normalisations use detached maxima
        ga = ga_hat / a_top
        gb = gb_hat / b_top
        # Sinkhorn, in reverse: steps (b_t, u_t = K b_t, a_t, s_t = K^T a_t)
        steps = [flat[4 * t:4 * t + 4] for t in range(T)]
        b_T, u_T, a_T = flat[4 * T:4 * T + 3]
        gu = _safe_div_grad(ga, a_T, u_T)
        left.append(gu.unsqueeze(-1))
        right.append(b_T.unsqueeze(-1))
        gb = gb + _xK(gu, K)
        for t in reversed(range(T)):
            b_t, u_t, a_t, s_t = steps[t]
            b_next = flat[4 * (t + 1)]
            gs = _safe_div_grad(gb, b_next, s_t)
            left.append(a_t.unsqueeze(-1))
            right.append(gs.unsqueeze(-1))
            ga = _Kx(K, gs)
            gu = _safe_div_grad(ga, a_t, u_t)
            left.append(gu.unsqueeze(-1))
            right.append(b_t.unsqueeze(-1))
            if t > 0:
                gb = _xK(gu, K)
        gqf, grf = _logit_grads(
            K, torch.cat(left, -1),
            torch.cat([r.transpose(-1, -2) for r in right], -2), qf, rf,
            *ctx.needs_input_grad[:2])
        return gqf, grf, gv, None


# -- choosing the implementation ---------------------------------------------
# 'auto': the fused kernel for the inputs' device where it can run (fp32 or
# fp64; the operator computes in >= fp32 anyway), else the reference, and
# on CUDA the faster of the two (measured); the others force one (an error
# where it cannot run).
BACKENDS = ('auto', 'reference', 'cpu', 'triton')


class _Backend(threading.local):
    name = os.environ.get('MMSETFORMER_SET_BACKEND', 'auto')


_BACKEND = _Backend()


def get_backend() -> str:
    """The SeT implementation in force: one of :data:`BACKENDS`."""
    return _BACKEND.name


@contextlib.contextmanager
def set_backend(name: str):
    """Force an implementation of :func:`set_attention` inside the context
    (``'reference'`` is the readable one every fused kernel is tested
    against); the default is ``'auto'`` or ``MMSETFORMER_SET_BACKEND``."""
    if name not in BACKENDS:
        raise ValueError(f'SeT backend must be one of {BACKENDS}, got '
                         f'{name!r}')
    old, _BACKEND.name = _BACKEND.name, name
    try:
        yield
    finally:
        _BACKEND.name = old


def _observed(x: Tensor) -> bool:
    """Whether a tool records this call's aten ops: tracers, exporters
    (``torch.export``, ONNX) and dispatch modes (FLOP and memory counters,
    op recorders, fake tensors).  The fused kernels are opaque to them; the
    reference is made of the ops they understand.  ``torch.compile`` is
    not one of them: the fused kernels are operators it keeps in its graphs
    (:class:`FusedImplementation`; dynamo cannot trace the query of the
    dispatch modes, and its own fake tensors are not the user's)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() \
        or _exporting() or torch.onnx.is_in_onnx_export() \
        or (not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is not None) \
        or x.device.type == 'meta'


def _exporting() -> bool:
    """Whether torch.export traces. Dynamo folds ``is_exporting()`` to
    True under any torch.compile on some releases (2.11, the GPU image's),
    which would hide the fused kernels from compiled graphs; the flag that
    torch.export sets around its tracing is read instead where it exists."""
    flag = getattr(torch.compiler, '_is_exporting_flag', None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _implementation(qf: Tensor, rf_rows: int = 0,
                    trial: Optional[Callable] = None):
    """The implementation that computes SeT for queries or their
    features ``qf`` (B, h, n, .) against ``rf_rows`` references;
    ``trial(fn)`` runs the call at hand with ``fn`` where ``auto`` measures
    (CUDA, see :data:`MEASURE`)."""
    from . import fused_cpu, fused_triton
    name = _BACKEND.name
    if name not in BACKENDS:
        raise ValueError(f'MMSETFORMER_SET_BACKEND must be one of {BACKENDS}'
                         f', got {name!r}')
    if name == 'reference':
        return _SeTFunction
    if name == 'cpu':
        if qf.device.type != 'cpu' or not fused_cpu.available():
            raise RuntimeError('SeT backend "cpu" needs CPU inputs and the '
                               'compiled kernel: ' + (
                                   fused_cpu.why_unavailable() or
                                   f'inputs are on {qf.device}'))
        return fused_cpu.IMPLEMENTATION
    if name == 'triton':
        reason = fused_triton.why_unavailable(qf)
        if reason:
            raise RuntimeError(f'SeT backend "triton" cannot run: {reason}')
        return fused_triton.IMPLEMENTATION
    if _observed(qf):
        return _SeTFunction
    if qf.device.type == 'cpu' and fused_cpu.available():
        return fused_cpu.IMPLEMENTATION
    if qf.device.type in _TRITON_DEVICES and \
            not fused_triton.why_unavailable(qf):
        if _kernel_bytes(qf, rf_rows) > FUSED_CUDA_MIN_BYTES:
            # the reference would hold several such tensors
            return fused_triton.IMPLEMENTATION
        if trial is not None and MEASURE and \
                not torch.are_deterministic_algorithms_enabled():
            if torch.compiler.is_compiling():
                # dynamo's tensors are fake: the choice is made on real
                # ones of the traced shapes while it traces, and the graph
                # keeps it; the reference where shapes are symbolic (one
                # graph for many sizes). (A name: dynamo cannot read an
                # autograd.Function's attributes.)
                if _static_shapes() and \
                        _traced_choice(trial.spec()) == 'triton':
                    return fused_triton.IMPLEMENTATION
                return _SeTFunction
            # (no timing while a CUDA graph is captured: the choice made
            # before, if any, else the reference)
            capturing = qf.device.type == 'cuda' and \
                torch.cuda.is_current_stream_capturing()
            return fastest(_candidates(), _size_class(qf, rf_rows), trial,
                           measure=not capturing)
    return _SeTFunction


def _candidates() -> tuple:
    """What ``auto`` measures on CUDA, the default first."""
    from . import fused_triton
    return _SeTFunction, fused_triton.IMPLEMENTATION


@torch.compiler.assume_constant_result
def _static_shapes() -> bool:
    """Whether the graph dynamo traces has no symbolic sizes (dynamic
    shapes make them symbols; dynamo answers ``isinstance(size, int)``
    with True for those too, so its shape environment is asked)."""
    try:
        env = torch._guards.TracingContext.try_get().fake_mode.shape_env
        return not (env.backed_var_to_val if hasattr(
            env, 'backed_var_to_val') else env.var_to_val)  # (older torch)
    except AttributeError:  # no context, no fake mode or no shape env
        return False


@torch.compiler.assume_constant_result
def _traced_choice(spec: tuple) -> str:
    """The backend :func:`fastest` picks for calls like ``spec``
    (:meth:`_Trial.spec`), measured on random tensors of its shapes unless
    the size class was measured before (in eager mode too).  Dynamo runs
    this for real while it traces and keeps the result as a constant;
    the call's grad mode and fp32 (no autocast) are set here rather than
    taken from whatever real modes the tracing leaves on."""
    device, eps, T, sigma, grad, leaves = spec
    with torch.set_grad_enabled(grad), torch.autocast(
            torch.device(device).type, enabled=False):
        q, refs, v, *pos = (
            torch.rand(shape, dtype=dtype, device=device).requires_grad_(
                grad and needs) for shape, dtype, needs in leaves)
        trial = _Trial((q, refs, v, eps, T, tuple(pos) or None, sigma))
        return fastest(_candidates(), _size_class(q, refs.shape[1]),
                       trial).backend


# Where `auto` considers the Triton kernels (the CPU has its own; the
# tests add it to run this choice under Triton's interpreter).
_TRITON_DEVICES = ('cuda', )
# One B*h*n*m fp32 kernel above this size makes `auto` pick the fused
# Triton kernels on CUDA (the reference keeps several such tensors).
FUSED_CUDA_MIN_BYTES = int(float(os.environ.get(
    'MMSETFORMER_SET_FUSED_MIN_BYTES', 2**31)))
# Below it, `auto` on CUDA measures which of the reference and the Triton
# kernels runs a call faster, once per size class (as cudnn.benchmark does
# for convolutions): which wins depends on the GPU (its FMA rate against
# its memory bandwidth) and on the size (launch overheads against passes
# over K). Not under torch.use_deterministic_algorithms (a choice that
# follows timings is not reproducible) nor with MMSETFORMER_SET_MEASURE=0:
# the reference then.
MEASURE = os.environ.get('MMSETFORMER_SET_MEASURE', '1') != '0'
_MEASURED: Dict[tuple, dict] = {}


def _size_class(qf: Tensor, m: int) -> tuple:
    """The size part of a measured choice's key: device, dtype, head width,
    the kernel's B*h*n*m to a factor of two and ``tl.dot``'s precision
    (the trial adds T, LPE and whether a backward follows)."""
    return (str(qf.device), qf.dtype, qf.shape[-1],
            max(1, qf.shape[:-1].numel() * m).bit_length(),
            os.environ.get('MMSETFORMER_SET_PRECISION', 'ieee'))


def fastest(candidates: Sequence, key: tuple, trial: Callable,
            measure: bool = True):
    """The candidate for which ``trial(fn)`` (the call at hand, run by
    ``fn``) takes least time, measured the first time ``key`` is seen: one
    call each to warm up (Triton compiles there), then the faster of two
    timed ones; later calls with ``key`` reuse the choice. A candidate
    that fails (a GPU whose resources a kernel exceeds, memory running out)
    is not chosen, with a warning. Without ``measure``, a key not yet seen
    gets the first candidate."""
    key = key + trial.key
    seen = _MEASURED.get(key)
    if seen is None and not measure:
        return candidates[0]
    if seen is None:
        times = {}
        for fn in candidates:
            try:
                trial(fn)
                times[fn] = min(_timed(trial, fn) for _ in range(2))
            except Exception as e:  # e.g. OutOfResources, OutOfMemoryError
                warnings.warn(f'SeT: the {fn.backend} implementation failed '
                              f'on {key} and is not used there: {e!r}')
                times[fn] = math.inf
        seen = _MEASURED[key] = dict(
            times={fn.backend: t for fn, t in times.items()},
            choice=min(times, key=times.get))
    return seen['choice']


def _timed(trial: Callable, fn) -> float:
    sync = torch.cuda.synchronize if trial.device.type == 'cuda' \
        else (lambda device: None)
    sync(trial.device)
    t0 = time.perf_counter()
    trial(fn)
    sync(trial.device)
    return time.perf_counter() - t0


def measured_choices() -> List[dict]:
    """What ``auto`` measured so far in this process, one entry per size
    class: its key (device, dtype, head width d, B*h*n*m below 2**bits,
    tl.dot precision, T, LPE, backward), each candidate's time in seconds
    and the one chosen."""
    names = ('device', 'dtype', 'd', 'bits', 'precision', 'num_iters',
             'lpe', 'backward')
    return [dict(zip(names, k[:-2] + (not k[-2], k[-1])),
                 dtype=str(k[1]).replace('torch.', ''), key=k,
                 times=dict(v['times']), choice=v['choice'].backend)
            for k, v in _MEASURED.items()]


def _kernel_bytes(qf: Tensor, m: int) -> int:
    return qf.shape[:-1].numel() * m * 4


def transport_plan(q: Tensor,
                   refs: Tensor,
                   *,
                   eps: float,
                   num_iters: int,
                   pos: Optional[Pos] = None,
                   sigma: Optional[float] = None) -> Tensor:
    """Dense transport plan P: (B, h, n, m), for analysis and visualisation.

    Args:
        q: queries (B, h, n, d).
        refs: references (h, m, d).
        eps: entropic regularisation (> 0).
        num_iters: Sinkhorn iterations T (>= 0).
        pos: optional ``(token_pos (n, k), ref_pos (m, k))`` in [0, 1]^k
            enabling the linear positional encoding with bandwidth ``sigma``.
    """
    _check(q, refs, eps, num_iters, pos, sigma)
    with torch.autocast(q.device.type, enabled=False):
        K = gibbs_kernel(q, refs, eps, pos, sigma)
        a, b = sinkhorn_scalings(K, num_iters)
        return a.unsqueeze(-1) * K * b.unsqueeze(-2)


def set_attention(q: Tensor,
                  v: Tensor,
                  refs: Tensor,
                  *,
                  eps: float,
                  num_iters: int,
                  pos: Optional[Pos] = None,
                  sigma: Optional[float] = None) -> Tensor:
    """SeT attention ``y = D_r^-1 P D_c^-1 P^T v`` without any n x n tensor.

    Args:
        q, v: queries and values (B, h, n, d).
        refs: references (h, m, d).
        eps, num_iters, pos, sigma: as in :func:`transport_plan`.

    Returns:
        y: (B, h, n, d) in the dtype of ``v``, stored as (B, n, h, d)
        (:func:`heads_last`); each y_i is a convex combination of the
        values.
    """
    _check(q, refs, eps, num_iters, pos, sigma)
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f'v must be (B, h, n, d) like q {tuple(q.shape[:3])}'
                         f', got {tuple(v.shape)}')
    out_dtype = v.dtype
    # Kernel, Sinkhorn and both aggregations stay in fp32 under autocast.
    with torch.autocast(q.device.type, enabled=False):
        dtype = _compute_dtype(q)
        args = (q.to(dtype), refs, v.to(dtype), eps, num_iters, pos, sigma)
        y = _apply(_implementation(args[0], refs.shape[-2], _Trial(args)),
                   *args)
    return y.to(out_dtype)


def _apply(fn, q: Tensor, refs: Tensor, v: Tensor, eps: float,
           num_iters: int, pos: Optional[Pos], sigma: Optional[float]):
    """SeT by the implementation ``fn`` (the reference's autograd function
    or a :class:`FusedImplementation`), given the inputs in the compute
    dtype."""
    # (identity first: dynamo 2.11 cannot take an autograd.Function class
    # to isinstance)
    if fn is not _SeTFunction and isinstance(fn, FusedImplementation):
        # (they build qf themselves)
        tok_f, rf = _ref_features(refs, pos, sigma, q.dtype, q.device)
        if tok_f is None:
            tok_f = q.new_empty(q.shape[2], 0)
        return fn.apply(q, tok_f, rf, v, float(eps), int(num_iters))
    qf, rf = _features(q, refs, eps, pos, sigma)
    return fn.apply(qf, rf, v, int(num_iters))


class _Trial:
    """The call at hand, run by a given function for :func:`fastest` on
    detached copies of its inputs: forward, and backward where the call
    will have one (the trials leave no gradients on the real inputs)."""

    def __init__(self, args: tuple):
        self.args = args
        self.device = args[0].device

    def _leaves(self) -> list:
        q, refs, v, _, _, pos, _ = self.args
        return [q, refs, v, *(pos or ())]

    @property
    def grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in self._leaves())

    @property
    def key(self) -> tuple:
        """The call's part of the size class: iterations, LPE, backward."""
        return (self.args[4], self.args[5] is None, self.grad)

    def spec(self) -> tuple:
        """The call as constants (device, eps, T, sigma, backward, and each
        input's shape, dtype and requires_grad), from which
        :func:`_traced_choice` rebuilds it."""
        leaves = tuple((tuple(t.shape), t.dtype, t.requires_grad)
                       for t in self._leaves())
        _, _, _, eps, T, _, sigma = self.args
        return (str(self.device), eps, T, sigma, self.grad, leaves)

    def __call__(self, fn):
        grad = self.grad
        q, refs, v, *pos = (t.detach().requires_grad_(grad and t.requires_grad)
                            for t in self._leaves())
        eps, T, _, sigma = self.args[3:]
        # the trial's own saved tensors, whatever hooks the call runs under
        # (activation checkpointing would recompute its region for them)
        with torch.set_grad_enabled(grad), \
                torch.autograd.graph.saved_tensors_hooks(_same, _same):
            y = _apply(fn, q, refs, v, eps, T, tuple(pos) or None, sigma)
            if grad:
                y.sum().backward()


def _same(x):
    return x
