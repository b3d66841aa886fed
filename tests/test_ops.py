"""Properties of the SeT operator (SPEC §1), each able to fail."""
import importlib

import pytest
import torch
from dense_reference import dense_set
from test_fused import _record
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmsetformer.ops import (grid_positions, kernel_workspace, set_attention,
                             set_backend, transport_plan)

# the module (the package attribute of the same name is the function)
set_attention_module = importlib.import_module(
    'mmsetformer.ops.set_attention')


def _inputs(B, h, n, m, d, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, n, d, generator=g, dtype=dtype)
    v = torch.randn(B, h, n, d, generator=g, dtype=dtype)
    r = torch.randn(h, m, d, generator=g, dtype=dtype)
    if grad:
        for t in (q, v, r):
            t.requires_grad_(True)
    return q, v, r


def _pos2d(hw, grid, dtype=torch.float64):
    return grid_positions(*hw, dtype=dtype), grid_positions(*grid, dtype=dtype)


def _pos1d(n, m, dtype=torch.float64):
    return ((torch.arange(n, dtype=dtype) + 0.5) / n)[:, None], \
        ((torch.arange(m, dtype=dtype) + 0.5) / m)[:, None]


CASES = [  # (hw, ref grid, d, T, eps, sigma)
    ((5, 7), (3, 4), 8, 0, 0.3, 0.8),
    ((5, 7), (3, 4), 8, 1, 0.1, 0.5),
    ((6, 6), (2, 5), 16, 3, 0.5, 0.3),
    ((3, 11), (4, 4), 4, 10, 1.0, 1.0),
    ((8, 9), (5, 5), 32, 5, 0.05, 0.6),
]


@pytest.mark.parametrize('lpe', [False, True])
@pytest.mark.parametrize('hw,grid,d,T,eps,sigma', CASES)
def test_matches_dense_reference_float64(hw, grid, d, T, eps, sigma, lpe):
    n, m = hw[0] * hw[1], grid[0] * grid[1]
    q, v, r = _inputs(2, 3, n, m, d)
    pos = _pos2d(hw, grid) if lpe else None
    kw = dict(eps=eps, num_iters=T, pos=pos, sigma=sigma if lpe else None)
    y_ref, P_ref, _ = dense_set(q, v, r, **kw)
    y = set_attention(q, v, r, **kw)
    P = transport_plan(q, r, **kw)
    assert y.dtype == torch.float64
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    assert torch.allclose(P, P_ref, atol=1e-6 / (n * m), rtol=1e-6)


def test_matches_dense_reference_1d_sequence():
    n, m = 50, 7
    q, v, r = _inputs(1, 2, n, m, 8)
    kw = dict(eps=0.3, num_iters=4, pos=_pos1d(n, m), sigma=0.4)
    assert torch.allclose(
        set_attention(q, v, r, **kw), dense_set(q, v, r, **kw)[0], atol=1e-6)


def test_plan_nonnegative_and_row_marginals_exact():
    q, _, r = _inputs(2, 2, 60, 9, 8, dtype=torch.float32)
    for T in (0, 1, 3):
        P = transport_plan(q, r, eps=0.2, num_iters=T,
                           pos=_pos2d((6, 10), (3, 3), torch.float32),
                           sigma=0.5)
        assert (P >= 0).all()
        assert torch.allclose(P.sum(-1), torch.full((2, 2, 60), 1 / 60),
                              rtol=1e-5, atol=0)


def test_column_marginal_error_shrinks_with_iterations():
    q, _, r = _inputs(1, 1, 80, 10, 8, seed=3)
    errs = []
    for T in range(0, 9):
        P = transport_plan(q, r, eps=0.3, num_iters=T)
        errs.append((P.sum(-2) - 1 / 10).abs().sum().item())
    assert errs[0] > 1e-2  # unbalanced to start with: a meaningful example
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.05 * errs[0]


def test_constant_values_give_same_constant():
    q, _, r = _inputs(2, 2, 30, 6, 8)
    v = torch.full((2, 2, 30, 8), 3.25, dtype=torch.float64)
    y = set_attention(q, v, r, eps=0.2, num_iters=3,
                      pos=_pos2d((5, 6), (2, 3)), sigma=0.5)
    assert torch.allclose(y, v, atol=1e-12)


def test_outputs_are_convex_combinations_of_values():
    q, v, r = _inputs(1, 2, 40, 5, 4)
    _, _, A = dense_set(q, v, r, eps=0.3, num_iters=2)
    assert (A >= 0).all() and torch.allclose(A.sum(-1),
                                             torch.ones_like(A[..., 0]))
    y = set_attention(q, v, r, eps=0.3, num_iters=2)
    assert (y <= v.amax(-2, keepdim=True) + 1e-12).all()
    assert (y >= v.amin(-2, keepdim=True) - 1e-12).all()


def test_permutation_equivariance_without_lpe():
    q, v, r = _inputs(2, 2, 45, 7, 8)
    perm = torch.randperm(45, generator=torch.Generator().manual_seed(1))
    y = set_attention(q, v, r, eps=0.3, num_iters=3)
    y_perm = set_attention(q[:, :, perm], v[:, :, perm], r, eps=0.3,
                           num_iters=3)
    assert torch.allclose(y_perm, y[:, :, perm], atol=1e-12)
    # ... and the LPE really breaks it (positions matter)
    kw = dict(eps=0.3, num_iters=3, pos=_pos2d((5, 9), (1, 7)), sigma=0.3)
    y = set_attention(q, v, r, **kw)
    y_perm = set_attention(q[:, :, perm], v[:, :, perm], r, **kw)
    assert not torch.allclose(y_perm, y[:, :, perm], atol=1e-3)


@pytest.mark.parametrize('scale', [1e-4, 1e-2, 1.0, 1e2, 1e4])
@pytest.mark.parametrize('autocast', [None, torch.bfloat16])
def test_finite_outputs_and_grads(scale, autocast):
    q, v, r = _inputs(2, 2, 48, 12, 16, dtype=torch.float32, grad=True)
    pos = _pos2d((6, 8), (3, 4), torch.float32)
    with torch.autocast('cpu', dtype=autocast or torch.bfloat16,
                        enabled=autocast is not None):
        qs, vs = q * scale, v * scale
        if autocast is not None:
            qs, vs = qs.to(autocast), vs.to(autocast)
        y = set_attention(qs, vs, r, eps=0.1, num_iters=3, pos=pos,
                          sigma=0.5)
    assert y.dtype == (autocast or torch.float32)
    assert torch.isfinite(y).all()
    # outputs stay within the range of the values (convexity), at any scale
    assert y.float().abs().max() <= vs.float().abs().max() * 1.01
    (y.float()**2).mean().backward()
    for t in (q, v, r):
        assert torch.isfinite(t.grad).all()


def test_zero_vectors_are_safe():
    q, v, r = _inputs(1, 2, 20, 4, 8, dtype=torch.float32, grad=True)
    with torch.no_grad():
        q[:, :, :5] = 0  # some zero queries
        r[:, 0] = 0      # a zero reference
    y = set_attention(q, v, r, eps=0.3, num_iters=3)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, v, r))
    # an all-zero query matches every reference equally: its row of P is
    # uniform before the column scaling, so it is finite and non-negative
    P = transport_plan(q.detach(), r.detach(), eps=0.3, num_iters=0)
    assert torch.allclose(P[0, :, 0], torch.full((2, 4), 1 / 80))


def test_extreme_eps_does_not_produce_nan():
    # tiny eps: most kernel entries underflow to 0; columns may be empty
    q, v, r = _inputs(1, 2, 64, 16, 8, dtype=torch.float32, grad=True)
    y = set_attention(q, v, r, eps=1e-3, num_iters=5,
                      pos=_pos2d((8, 8), (4, 4), torch.float32), sigma=0.1)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(q.grad).all()


def test_gradcheck_float64():
    q, v, r = _inputs(1, 2, 6, 3, 4, grad=True)
    pos = _pos2d((2, 3), (1, 3))

    def fn(q, v, r):
        return set_attention(q, v, r, eps=0.5, num_iters=2, pos=pos,
                             sigma=0.7)

    assert torch.autograd.gradcheck(fn, (q, v, r), eps=1e-6, atol=1e-6)


def test_blocked_kernel_gradient_matches_dense_reference(monkeypatch):
    # 2 x 3 batches of m = 12 columns: blocks of 7 rows, n = 40 leaves a
    # partial last block
    monkeypatch.setattr(set_attention_module, '_GRAD_BLOCK_ELEMS', 6 * 12 * 7)
    kw = dict(eps=0.3, num_iters=3, pos=_pos2d((5, 8), (3, 4)), sigma=0.6)
    grads = []
    for fn in (set_attention, lambda *a, **k: dense_set(*a, **k)[0]):
        q, v, r = _inputs(2, 3, 40, 12, 8, grad=True)
        y = fn(q, v, r, **kw)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
         ).sum().backward()
        grads.append((q.grad, v.grad, r.grad))
    for g, g_ref in zip(*grads):
        assert torch.allclose(g, g_ref, atol=1e-8, rtol=1e-6)


def test_kernel_workspace_gives_the_same_outputs_and_gradients():
    q, v, r = _inputs(2, 2, 48, 12, 8, dtype=torch.float32, grad=True)
    kw = dict(eps=0.3, num_iters=3, pos=_pos2d((6, 8), (3, 4), torch.float32),
              sigma=0.6)
    y0 = set_attention(q, v, r, **kw)
    g0 = torch.autograd.grad(y0.square().sum(), (q, v, r))
    with kernel_workspace():
        with torch.no_grad():  # writes the shared buffer
            y_ng = set_attention(q, v, r, **kw)
            small = set_attention(q[:, :, :20], v[:, :, :20], r, eps=0.3,
                                  num_iters=3)
        y1 = set_attention(q, v, r, **kw)  # keeps its own kernel
        with torch.no_grad():  # must not overwrite y1's saved kernel
            set_attention(q.flip(2), v, r, **kw)
        g1 = torch.autograd.grad(y1.square().sum(), (q, v, r))
    assert torch.equal(y_ng, y0) and torch.equal(y1, y0)
    assert torch.allclose(small, set_attention(
        q[:, :, :20], v[:, :, :20], r, eps=0.3, num_iters=3).detach())
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    assert set_attention_module._WORKSPACE.buf is None  # freed on exit


def test_kernel_workspace_shares_position_features_safely(monkeypatch):
    """Inside one kernel_workspace the calls on the same positions share
    their LPE features (built once); positions of other content, or
    changed in place, get their own; positions that take gradients are
    not shared. Outputs and gradients equal those outside."""
    m = set_attention_module
    built = []
    _record(monkeypatch, m, '_position_features', built)
    q, v, r = _inputs(1, 2, 12, 6, 8, dtype=torch.float32, grad=True)
    tok, ref = _pos2d((3, 4), (2, 3), torch.float32)
    other = (tok.flip(0), ref)
    kw = dict(eps=0.3, num_iters=2, sigma=0.6)

    def run(pos):
        y = set_attention(q, v, r, pos=pos, **kw)
        return (y, *torch.autograd.grad(y.square().sum(), (q, v, r)))
    outside = [run((tok, ref)), run(other)]
    built.clear()
    with kernel_workspace():
        shared = [run((tok, ref)), run((tok, ref)), run(other)]
        assert len(built) == 2  # (tok, ref) once, then the other positions
        tok.mul_(0.5)  # in place: a new version
        changed = run((tok, ref))
        assert len(built) == 3
        learned = ref.clone().requires_grad_()
        run((tok, learned)), run((tok, learned))
        assert len(built) == 5
    tok.mul_(2)
    for got, want in zip(shared, [outside[0], outside[0], outside[1]]):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert not torch.equal(changed[0], outside[0][0])
    assert set_attention_module._WORKSPACE.memo is None  # freed on exit


class _OpRecorder(TorchDispatchMode):
    """Records every aten op and the shapes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in tree_flatten(out)[0]
                  if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, shapes))
        return out


def test_kernel_built_once_and_no_n_by_n_tensor():
    n, m, T = 300, 30, 6
    q, v, r = _inputs(1, 1, n, m, 4, dtype=torch.float32, grad=True)
    with _OpRecorder() as rec:
        y = set_attention(q, v, r, eps=0.3, num_iters=T,
                          pos=_pos2d((15, 20), (5, 6), torch.float32),
                          sigma=0.5)
        forward_ops = len(rec.ops)
        y.square().sum().backward()
    exps = [o for o in rec.ops[:forward_ops] if o[0] in ('exp', 'exp_')]
    assert len(exps) == 1 and exps[0][1] == [(1, 1, n, m)]
    largest = max(
        (s for _, shapes in rec.ops for s in shapes),
        key=lambda s: torch.Size(s).numel())
    assert torch.Size(largest).numel() <= n * m, largest
    assert all(n * n > torch.Size(s).numel()
               for _, shapes in rec.ops for s in shapes)


def _peak_bytes(n, m=64, d=16, h=2, T=3):
    q, v, r = _inputs(1, h, n, m, d, dtype=torch.float32, grad=True)
    pos = (grid_positions(n // 32, 32), grid_positions(8, 8))
    tracker = MemTracker()
    tracker.track_external(q, v, r)
    with tracker:
        y = set_attention(q, v, r, eps=0.3, num_iters=T, pos=pos, sigma=0.5)
        y.square().mean().backward()
    peak = tracker.get_tracker_snapshot('peak')
    return sum(s['Total'] for s in peak.values())


def test_peak_memory_linear_in_tokens():
    sizes = [1024, 4096, 16384]
    peaks = [_peak_bytes(n) for n in sizes]
    # an n x n fp32 tensor at the largest size alone would be 1 GiB
    assert peaks[-1] < 16384**2 * 4 / 8
    for (n0, p0), (n1, p1) in zip(zip(sizes, peaks),
                                  list(zip(sizes, peaks))[1:]):
        ratio = (p1 / p0) / (n1 / n0)
        assert 0.8 < ratio < 1.15, (sizes, peaks)


@pytest.mark.parametrize('device', ['cpu'] + (
    ['cuda'] if torch.cuda.is_available() else []))
def test_reference_rebuilds_the_kernel_for_its_backward(device, monkeypatch):
    """KEEP_KERNEL=0 (the default on GPUs): the reference saves no n x m
    tensor for its backward and rebuilds K there, with the same gradients
    as keeping it."""
    g = torch.Generator().manual_seed(0)
    B, h, n, m, d = 2, 2, 90, 35, 8
    q, v = (torch.randn(B, h, n, d, generator=g).to(device) for _ in '01')
    r = torch.randn(h, m, d, generator=g).to(device)
    pos = (grid_positions(9, 10, device=device),
           grid_positions(5, 7, device=device))
    out = {}
    for keep in ('1', '0'):
        monkeypatch.setattr(set_attention_module, 'KEEP_KERNEL', keep)
        leaves = [t.clone().requires_grad_() for t in (q, v, r)]
        saved = []
        with set_backend('reference'), \
                torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = set_attention(*leaves, eps=0.2, num_iters=3, pos=pos,
                              sigma=0.5)
        y.square().sum().backward()
        out[keep] = (y.detach(), *(t.grad for t in leaves))
        assert (max(saved) >= B * h * n * m) == (keep == '1'), saved
    for a, b in zip(out['1'], out['0']):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    if device == 'cpu':  # the same product on the same rows: the same K
        assert all(torch.equal(a, b) for a, b in zip(out['1'], out['0']))
    monkeypatch.setattr(set_attention_module, 'KEEP_KERNEL', 'auto')
    assert set_attention_module._keeps_kernel(q) == (device == 'cpu')
