"""SeT on CUDA (skipped without a GPU): the reference and the Triton kernels
against the dense float64 reference, and the Triton kernels' TF32 error."""
import pytest
import torch
from dense_reference import dense_set

from mmsetformer.ops import grid_positions, set_attention, set_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
]


def _case(dtype, device='cuda', n_side=(9, 13), grid=(5, 7), d=28, B=2, h=3):
    g = torch.Generator().manual_seed(0)
    n, m = n_side[0] * n_side[1], grid[0] * grid[1]
    q, v = (torch.randn(B, h, n, d, generator=g, dtype=torch.float64)
            for _ in range(2))
    r = torch.randn(h, m, d, generator=g, dtype=torch.float64)
    pos = (grid_positions(*n_side, dtype=torch.float64),
           grid_positions(*grid, dtype=torch.float64))
    dev = [t.to(device, dtype).requires_grad_() for t in (q, v, r)]
    host = [t.requires_grad_() for t in (q, v, r)]
    return dev, host, pos


def _grads(y, inputs):
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype,
                        device=y.device).view_as(y)
    return (y.detach(), *torch.autograd.grad(y, inputs, gy))


@pytest.mark.parametrize('backend', ['reference', 'triton', 'auto'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_matches_dense_float64_on_cuda(backend, dtype):
    dev, host, pos = _case(dtype)
    kw = dict(eps=0.3, num_iters=3, sigma=0.6)
    with set_backend(backend):
        ours = _grads(set_attention(
            *dev, pos=tuple(p.to('cuda', dtype) for p in pos), **kw), dev)
    ref = _grads(dense_set(*host, pos=pos, **kw)[0], host)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        err = (a.double().cpu() - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), (name, err)


@pytest.mark.parametrize('precision', ['tf32x3', 'tf32'])
def test_tf32_error_is_reported(precision, monkeypatch, capsys):
    """Not a gate: prints the error of TF32 inputs to tl.dot against the
    float64 reference, the measurement a default has to rest on."""
    monkeypatch.setenv('MMSETFORMER_SET_PRECISION', precision)
    dev, host, pos = _case(torch.float32)
    kw = dict(eps=0.1, num_iters=3, sigma=0.5)
    with set_backend('triton'):
        y = set_attention(*dev, pos=tuple(p.cuda().float() for p in pos),
                          **kw)
    ref = dense_set(*host, pos=pos, **kw)[0]
    err = (y.double().cpu() - ref).abs().max().item()
    print(f'{precision}: max |y - y_float64| = {err:.2e}')
    assert torch.isfinite(y).all()
