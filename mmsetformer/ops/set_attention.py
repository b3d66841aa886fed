"""SeT: Self-optimal Transport attention (torch only).

Per head, n tokens are matched to m references by an entropic optimal
transport plan ``P = diag(a) K diag(b)`` (Sinkhorn) over the Gibbs kernel

    log K_ij = (cos(q_i, r_j) - 1) / eps - ||p_i - pbar_j||^2 / sigma^2,

values are aggregated into the m reference cells (``z = D_c^-1 P^T v``) and
redistributed to the tokens (``y = D_r^-1 P z``).  ``A = D_r^-1 P D_c^-1 P^T``
is never built: the only n x m tensor is ``K``, built once and reused by every
Sinkhorn iteration, so time is O(n m (d + T)) and memory O(n m) per head.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    'set_attention', 'transport_plan', 'grid_positions', 'reference_grid',
    'sinkhorn_scalings', 'gibbs_kernel'
]

# Guards the norms of the cosine (so zero vectors are safe).
NORM_DELTA = 1e-6
# Kernel floor, relative to each row's max: exp(-30) ~ 1e-13. Below it an
# entry is numerically irrelevant, but a column made only of such entries
# needs a scaling b ~ 1/K that overflows fp32 in the backward pass (its
# gradient carries b^2); the floor keeps b, and the gradients, finite.
LOG_KERNEL_FLOOR = 30.0

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


def gibbs_kernel(q: Tensor,
                 refs: Tensor,
                 eps: float,
                 pos: Optional[Pos] = None,
                 sigma: Optional[float] = None) -> Tensor:
    """Row-max stabilised Gibbs kernel ``K``: (B, h, n, m), >= fp32, with
    entries in [exp(-LOG_KERNEL_FLOOR), 1].

    The LPE penalty ``||p_i - pbar_j||^2 / sigma^2`` expands into an inner
    product of (k + 2)-dim position features, so it joins the cosine in one
    matmul instead of adding an extra n x m pass.
    """
    dtype = _compute_dtype(q)
    qf = _unit(q.to(dtype)) / eps
    rf = _unit(refs.to(dtype)).unsqueeze(0)
    if pos is not None:
        tok, ref = (p.to(device=q.device, dtype=dtype) for p in pos)
        s2 = float(sigma)**2
        one_t = tok.new_ones(tok.shape[0], 1)
        one_r = ref.new_ones(ref.shape[0], 1)
        # -||t - r||^2 = [-|t|^2, 2t, 1] . [1, r, -|r|^2]
        tok_f = torch.cat([-(tok * tok).sum(-1, keepdim=True), 2 * tok, one_t],
                          -1) / s2
        ref_f = torch.cat([one_r, ref, -(ref * ref).sum(-1, keepdim=True)], -1)
        b, h, n, _ = qf.shape
        qf = torch.cat([qf, tok_f.expand(b, h, n, -1)], -1)
        rf = torch.cat([rf, ref_f.expand(1, h, -1, -1)], -1)
    logits = torch.matmul(qf, rf.transpose(-1, -2))
    # P, and everything computed from it, is invariant to a per-row shift of
    # log K (the row scaling absorbs it), so the max needs no gradient.
    logits = logits - logits.amax(-1, keepdim=True).detach()
    logits = logits.clamp_min(-LOG_KERNEL_FLOOR)
    return logits.exp_() if not logits.requires_grad else logits.exp()


def _safe_div(num, den: Tensor) -> Tensor:
    """num / den, and 0 where den underflowed (< smallest normal float).

    A reference whose kernel column underflowed receives no mass whatever
    its scaling, so 0 is as good as the undefined 1/0 and keeps the other
    scalings' range intact. The inner ``where`` keeps inf out of the
    backward pass too (grad of 1/den at den=0)."""
    ok = den > torch.finfo(den.dtype).tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)),
                       torch.zeros_like(den))


def sinkhorn_scalings(K: Tensor, num_iters: int) -> Tuple[Tensor, Tensor]:
    """Scalings ``a`` (B, h, n, 1) and ``b`` (B, h, m, 1) of ``P = aKb^T``.

    Starts from b = 1 and alternates the row (P1 = 1/n) and column
    (P^T 1 = 1/m) scalings ``num_iters`` times, ending with a row scaling, so
    the rows of P sum to 1/n exactly and its columns approach 1/m.
    """
    n, m = K.shape[-2], K.shape[-1]
    b = K.new_ones(K.shape[:-2] + (m, 1))
    Kt = K.transpose(-1, -2)
    for _ in range(num_iters):
        a = _safe_div(1.0 / n, torch.matmul(K, b))
        b = _safe_div(1.0 / m, torch.matmul(Kt, a))
    a = _safe_div(1.0 / n, torch.matmul(K, b))
    return a, b


def _max_normalised(x: Tensor) -> Tensor:
    # The aggregation is invariant to a global scale of a (or b); bounding the
    # scaling by 1 keeps ``a * v`` finite whatever Sinkhorn did.
    top = x.amax(-2, keepdim=True).detach()
    return x / top.clamp_min(torch.finfo(x.dtype).tiny)


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
        return a * K * b.transpose(-1, -2)


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
        y: (B, h, n, d) in the dtype of ``v``; each y_i is a convex
        combination of the values.
    """
    _check(q, refs, eps, num_iters, pos, sigma)
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f'v must be (B, h, n, d) like q {tuple(q.shape[:3])}'
                         f', got {tuple(v.shape)}')
    out_dtype = v.dtype
    # Kernel, Sinkhorn and both aggregations stay in fp32 under autocast.
    with torch.autocast(q.device.type, enabled=False):
        K = gibbs_kernel(q, refs, eps, pos, sigma)
        a, b = sinkhorn_scalings(K, num_iters)
        a, b = _max_normalised(a), _max_normalised(b)
        vf = v.to(K.dtype)
        Kt = K.transpose(-1, -2)
        # z_j = sum_i P_ij v_i / sum_i P_ij: one pass over K for both sums.
        za = torch.matmul(Kt, torch.cat([a * vf, a], -1))
        z = _safe_div(za[..., :-1], za[..., -1:])
        # y_i = sum_j P_ij z_j / sum_j P_ij
        yb = torch.matmul(K, torch.cat([b * z, b], -1))
        y = _safe_div(yb[..., :-1], yb[..., -1:])
    return y.to(out_dtype)
