"""Dense SeT reference: builds K, P and the n x n attention A explicitly.

Written from SPEC §1 independently of the library (no shared helpers), for
tests only.
"""
import torch


def dense_set(q, v, refs, eps, num_iters, pos=None, sigma=None, delta=1e-6,
              floor=30.0):
    """Returns (y, P, A) for q, v (B, h, n, d) and refs (h, m, d)."""
    qn = q / (q.norm(dim=-1, keepdim=True) + delta)
    rn = refs / (refs.norm(dim=-1, keepdim=True) + delta)
    log_k = (qn @ rn.transpose(-1, -2) - 1) / eps
    if pos is not None:
        tok, ref = pos
        dist2 = ((tok[:, None, :] - ref[None, :, :])**2).sum(-1)
        log_k = log_k - dist2 / sigma**2
    log_k = log_k - log_k.max(-1, keepdim=True).values
    K = log_k.clamp(min=-floor).exp()  # SPEC: entries >= exp(-30) * row max
    n, m = K.shape[-2:]
    b = torch.ones(K.shape[:-2] + (m, ), dtype=K.dtype)
    for _ in range(num_iters):
        a = (1 / n) / torch.einsum('...ij,...j->...i', K, b)
        b = (1 / m) / torch.einsum('...ij,...i->...j', K, a)
    a = (1 / n) / torch.einsum('...ij,...j->...i', K, b)
    P = a[..., :, None] * K * b[..., None, :]
    row = P / P.sum(-1, keepdim=True)   # D_r^-1 P
    col = P / P.sum(-2, keepdim=True)   # P D_c^-1
    A = row @ col.transpose(-1, -2)     # n x n, row-stochastic
    return A @ v, P, A
