"""The fused SeT implementations against the reference and a dense float64
one (SPEC §7): the compiled CPU kernel, and the Triton kernels, which run
here under Triton's interpreter (conftest sets TRITON_INTERPRET=1 on hosts
without CUDA)."""
import contextlib
import importlib
import math
import os.path as osp
import platform
import sys
import time

import pytest
import torch
import torch.utils.flop_counter
from dense_reference import dense_set

from mmsetformer.ops import (fused_cpu, fused_triton, get_backend,
                             gibbs_kernel, grid_positions, set_attention,
                             set_backend, sinkhorn_scalings)

set_attention_module = importlib.import_module(
    'mmsetformer.ops.set_attention')
# 'cpu-streamed' / 'triton-streamed': the kernels rebuilding every pass's
# blocks of the kernel instead of keeping it (by default only for huge
# kernels); 'cpu-shared': the CPU kernel running its slices one after the
# other over all threads (by default only where few, or where their
# kernels outgrow the caches)
FUSED = ['cpu', 'cpu-streamed', 'cpu-shared', 'triton', 'triton-streamed']


def _inputs(B, h, n, m, d, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, n, d, generator=g, dtype=dtype) * scale
    v = torch.randn(B, h, n, d, generator=g, dtype=dtype) * scale
    r = torch.randn(h, m, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, v, r)]


def _pos(hw, grid, dtype):
    if isinstance(hw, int):  # a 1-D sequence against a 1-D reference row
        return ((torch.arange(hw, dtype=dtype) + 0.5) / hw)[:, None], \
            ((torch.arange(grid, dtype=dtype) + 0.5) / grid)[:, None]
    return grid_positions(*hw, dtype=dtype), grid_positions(*grid,
                                                            dtype=dtype)


def _grads(y, inputs):
    """y and the gradients of ``inputs`` for a fixed upstream gradient."""
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype,
                        device=y.device).view_as(y)
    return (y.detach(), *torch.autograd.grad(y, inputs, gy))


@contextlib.contextmanager
def _backend(name):
    """set_backend, with the fused kernels' modes: 'cpu-streamed',
    'cpu-shared' and 'triton-streamed'."""
    with set_backend(name.split('-')[0]), fused_cpu.stream_above(
            0 if name == 'cpu-streamed' else fused_cpu.STREAM_BYTES), \
            fused_cpu.share_above(
                0 if name == 'cpu-shared' else fused_cpu.SHARE_BYTES), \
            fused_triton.stream_above(
                0 if name == 'triton-streamed' else fused_triton.STREAM_BYTES):
        yield


def _run(backend, q, v, r, **kw):
    """Output and gradients of q, v, refs of SeT run by ``backend``."""
    with _backend(backend):
        return _grads(set_attention(q, v, r, **kw), (q, v, r))


@pytest.fixture
def small_tiles(monkeypatch):
    # several row and reference tiles even on tiny inputs
    monkeypatch.setattr(fused_triton, 'BLOCK_N', 16)
    monkeypatch.setattr(fused_triton, 'BLOCK_M', 16)


def _available(backend, x):
    if backend.startswith('cpu'):
        return fused_cpu.why_unavailable()
    return fused_triton.why_unavailable(x)


# n and m not multiples of any tile or vector width; B*h > 1
CASES = [  # (B, h, hw, grid, d, T, eps, sigma, lpe)
    (2, 3, (5, 7), (3, 4), 8, 0, 0.3, 0.8, True),
    (2, 3, (5, 7), (3, 4), 8, 1, 0.1, 0.5, False),
    (1, 2, (9, 13), (5, 7), 29, 3, 0.3, 0.6, True),
    (3, 1, (4, 5), (7, 9), 5, 4, 0.5, 0.3, True),
    (1, 2, (17, 3), (2, 13), 12, 5, 1.0, 1.0, False),
    (2, 2, 41, 11, 6, 2, 0.2, 0.4, True),  # 1-D sequence
]


@pytest.mark.parametrize('backend', FUSED + ['reference'])
@pytest.mark.parametrize('B,h,hw,grid,d,T,eps,sigma,lpe', CASES)
def test_matches_dense_float64(backend, B, h, hw, grid, d, T, eps, sigma, lpe,
                               small_tiles):
    n = hw if isinstance(hw, int) else hw[0] * hw[1]
    m = grid if isinstance(grid, int) else grid[0] * grid[1]
    q, v, r = _inputs(B, h, n, m, d, torch.float64)
    reason = _available(backend, q) if backend != 'reference' else ''
    if reason:
        pytest.skip(reason)
    kw = dict(eps=eps, num_iters=T, pos=_pos(hw, grid, torch.float64)
              if lpe else None, sigma=sigma if lpe else None)
    ours = _run(backend, q, v, r, **kw)

    ref = _grads(dense_set(q, v, r, **kw)[0], (q, v, r))
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), \
            (name, (a - b).abs().max().item())


# (the streamed Triton kernels' fp32 arithmetic: the extremes below)
@pytest.mark.parametrize('backend',
                         [b for b in FUSED if b != 'triton-streamed'])
@pytest.mark.parametrize('B,h,hw,grid,d,T,eps,sigma,lpe', CASES[:4])
def test_matches_reference_float32(backend, B, h, hw, grid, d, T, eps, sigma,
                                   lpe, small_tiles):
    n, m = hw[0] * hw[1], grid[0] * grid[1]
    q, v, r = _inputs(B, h, n, m, d, torch.float32, seed=1)
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    kw = dict(eps=eps, num_iters=T, pos=_pos(hw, grid, torch.float32)
              if lpe else None, sigma=sigma if lpe else None)
    ours, ref = _run(backend, q, v, r, **kw), _run('reference', q, v, r, **kw)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        tol = 1e-5 * b.abs().max().item() + 1e-7
        assert (a - b).abs().max().item() <= tol, \
            (name, (a - b).abs().max().item(), tol)


# the property tests' extremes: scales 1e-4..1e4, zero vectors, eps = 0.01
@pytest.mark.parametrize('backend', FUSED)
@pytest.mark.parametrize('scale,eps,zeros', [
    (1e-4, 0.3, False), (1e4, 0.3, False), (1.0, 0.01, False),
    (1.0, 0.3, True)])
def test_extreme_inputs_match_reference(backend, scale, eps, zeros,
                                        small_tiles):
    q, v, r = _inputs(2, 2, 40, 12, 8, torch.float32, seed=2, scale=scale)
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    if zeros:
        with torch.no_grad():
            q[:, :, :6] = 0
            r[:, 0] = 0
    kw = dict(eps=eps, num_iters=3, pos=_pos((5, 8), (3, 4), torch.float32),
              sigma=0.5)
    ours, ref = _run(backend, q, v, r, **kw), _run('reference', q, v, r, **kw)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        assert torch.isfinite(a).all(), name
        tol = 1e-4 * b.abs().max().item() + 1e-6
        assert (a - b).abs().max().item() <= tol, \
            (name, (a - b).abs().max().item(), tol)


@pytest.mark.parametrize('backend', FUSED)
def test_rows_whose_logits_all_lie_far_below_zero(backend, small_tiles):
    """Queries opposite to every reference at eps = 0.01: a row's largest
    logit is about -100, so exp(0 - max) overflows fp32 wherever a kernel
    would rebuild the entries of a padded tile's missing columns without
    a clamp (0 * inf = NaN in the products with their zero operands)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 30, 8, generator=g) * 0.01
    q[..., 0] = 1
    r = torch.randn(2, 13, 8, generator=g) * 0.01
    r[..., 0] = -1
    v = torch.randn(2, 2, 30, 8, generator=g)
    q, v, r = (t.requires_grad_() for t in (q, v, r))
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    kw = dict(eps=0.01, num_iters=3)
    ours, ref = _run(backend, q, v, r, **kw), _run('reference', q, v, r, **kw)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        assert torch.isfinite(a).all(), name
        tol = 1e-3 * b.abs().max().item()  # fp32 at eps = 0.01
        assert (a - b).abs().max().item() <= tol, \
            (name, (a - b).abs().max().item(), tol)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('backend', FUSED)
def test_a_reference_clamped_in_every_row(backend, dtype, small_tiles):
    """One reference opposite to every query at eps = 0.02: its column of
    K lies at the floor in every row, so Sinkhorn scales it up by ~e^30 to
    give it its 1/m of the mass, and dL/dK is ~e^30 there: only the
    floor's mask (no gradient through a clamped entry) keeps its product
    with K from moving dL/dq and dL/drefs at the scale of the gradients."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 24, 6, generator=g, dtype=torch.float64)
    q[..., 0] = 4
    r = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    r[:, 0] = 0
    r[:, 0, 0] = -1
    v = torch.randn(1, 2, 24, 6, generator=g, dtype=torch.float64)
    q, v, r = (t.to(dtype).requires_grad_() for t in (q, v, r))
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    kw = dict(eps=0.02, num_iters=2)
    ours, ref = _run(backend, q, v, r, **kw), _run('reference', q, v, r, **kw)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        err = (a - b).abs().max().item()
        assert err <= tol * b.abs().max().item(), (name, err)


@pytest.mark.parametrize('backend', FUSED)
@pytest.mark.parametrize('d', [8, 14])
def test_learned_reference_positions_get_the_reference_gradient(
        backend, d, small_tiles):
    """Reference positions that require a gradient (the models keep theirs
    fixed) get the reference's, through the positional features' own
    columns of the fused kernels' dL/drf (Triton: d = 8 with the 4
    position features folded into the dot's padding, d = 14 with them
    apart)."""
    q, v, r = _inputs(2, 2, 35, 12, d, torch.float64, seed=4)
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    tok, ref = _pos((5, 7), (3, 4), torch.float64)
    ref.requires_grad_()
    grads = []
    for name in (backend, 'reference'):
        with _backend(name):
            y = set_attention(q, v, r, eps=0.3, num_iters=2, pos=(tok, ref),
                              sigma=0.5)
        grads.append(_grads(y, (ref, r))[1:])
    for a, b in zip(*grads):
        assert b.abs().max() > 1e-3
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), \
            (a - b).abs().max().item()


def test_partial_gradients_and_autocast_inputs():
    """Only some inputs need gradients; bf16 inputs under autocast."""
    q, v, r = _inputs(2, 2, 30, 6, 8, torch.float32, seed=3)
    kw = dict(eps=0.3, num_iters=2, pos=_pos((5, 6), (2, 3), torch.float32),
              sigma=0.5)
    fused = [b for b in ('cpu', 'cpu-streamed', 'triton')
             if not _available(b, q)]
    if not fused:
        pytest.skip('no fused SeT runs here')
    outs = {}
    for backend in ['reference'] + fused:
        with _backend(backend):
            y = set_attention(q.detach(), v, r.detach(), **kw)
            (gv, ) = torch.autograd.grad(y.sum(), (v, ))
            with torch.autocast('cpu', dtype=torch.bfloat16):
                yb = set_attention(q.bfloat16(), v.bfloat16(), r, **kw)
        outs[backend] = (y.detach(), gv, yb.detach())
    for backend in fused:
        assert outs[backend][2].dtype == torch.bfloat16
        for a, b in zip(outs[backend], outs['reference']):
            assert torch.allclose(a.float(), b.float(), atol=1e-5,
                                  rtol=1e-5), backend


def test_cpu_kernel_is_built_and_chosen(monkeypatch):
    # the install builds it; a silent fallback would lose its speed
    if platform.machine().lower() in ('x86_64', 'amd64', 'aarch64'):
        assert fused_cpu.available(), fused_cpu.why_unavailable()
    chosen, pick = [], set_attention_module._implementation
    monkeypatch.setattr(set_attention_module, '_implementation',
                        lambda qf, *a: chosen.append(pick(qf, *a))
                        or chosen[-1])
    q = torch.randn(1, 2, 10, 4)
    assert get_backend() == 'auto'
    set_attention(q, q, q[0, :, :5], eps=0.3, num_iters=1)
    assert chosen[-1] is fused_cpu.IMPLEMENTATION
    # the reference where tools record aten ops: tracers, dispatch modes
    torch.jit.trace(
        lambda q: set_attention(q, q, q[0, :, :5], eps=0.3, num_iters=1), q,
        check_trace=False)
    assert chosen[-1] is set_attention_module._SeTFunction
    with torch.utils.flop_counter.FlopCounterMode(display=False) as flops:
        set_attention(q, q, q[0, :, :5], eps=0.3, num_iters=1)
    assert chosen[-1] is set_attention_module._SeTFunction
    assert flops.get_total_flops() > 0
    with set_backend('reference'):
        set_attention(q, q, q[0, :, :5], eps=0.3, num_iters=1)
    assert chosen[-1] is set_attention_module._SeTFunction


def _compiled(kw):
    """SeT with ``kw`` under torch.compile: dynamo and AOTAutograd (the
    graphs inductor would get), one graph or an error."""
    torch._dynamo.reset()
    return torch.compile(lambda q, v, r: set_attention(q, v, r, **kw),
                         backend='aot_eager', fullgraph=True)


def _opcheck(module, q, v, r, pos, *extra):
    """torch.library.opcheck of a fused implementation's two operators:
    schemas, fake shapes against the real ones, autograd registration."""
    tok, rf = set_attention_module._ref_features(r, pos, 0.5, q.dtype,
                                                 q.device)
    args = (q, tok, rf[0].detach().requires_grad_(), v, 0.3, 2, *extra)
    torch.library.opcheck(module._forward, args)
    fwd = [t.detach() for t in module._forward(*args)]
    gy = torch.randn_like(fwd[0])
    for need in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(module._backward, (
            *(t.detach() for t in args[:4]), fwd, gy, *need, 0.3, *extra))


def _record(monkeypatch, owner, name: str, calls: list):
    """``owner.name`` appending ``name`` to ``calls`` on every call."""
    fn = getattr(owner, name)
    monkeypatch.setattr(owner, name,
                        lambda *a, **k: calls.append(name) or fn(*a, **k))


def _record_launches(monkeypatch) -> list:
    """[(kernel name, constexprs)] of every Triton launch from now on."""
    launches, launch = [], fused_triton._launch

    def record(kernel, grid, *args, **meta):
        launches.append((kernel.fn.__name__, meta))
        launch(kernel, grid, *args, **meta)
    monkeypatch.setattr(fused_triton, '_launch', record)
    return launches


@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_torch_compile_keeps_the_fused_kernels(backend, monkeypatch):
    """The fused kernels are torch.library operators: opcheck finds their
    schemas, fake shapes and autograd consistent with the kernels. Under
    torch.compile SeT runs them, forward and backward in one graph, with
    the reference's outputs and gradients: the CPU kernel under ``auto``;
    Triton's where ``auto`` takes them without measuring, and when forced
    (below that size with measuring off, the reference;
    ``test_auto_measures_while_compiling`` has the measuring). torch.export
    records the reference, made of the ops exporters know."""
    q, v, r = _inputs(2, 2, 20, 6, 5, torch.float32)
    pos = _pos((4, 5), (2, 3), torch.float32)
    kw = dict(eps=0.3, num_iters=2, pos=pos, sigma=0.5)
    if _available(backend, q):
        pytest.skip(_available(backend, q))
    ref = _run('reference', q, v, r, **kw)
    calls, runs = [], [(None, True)]
    if backend == 'cpu':
        _opcheck(fused_cpu, q, v, r, pos, fused_cpu.STREAM_BYTES,
                 fused_cpu.SHARE_BYTES)
        _record(monkeypatch, fused_cpu._ext, 'forward', calls)
        _record(monkeypatch, fused_cpu._ext, 'backward', calls)
    else:
        for stream_bytes in (fused_triton.STREAM_BYTES, 0):
            _opcheck(fused_triton, q, v, r, pos, stream_bytes)
        _record(monkeypatch, fused_triton, '_launch', calls)
        # `auto` as on CUDA (the CPU in the Triton kernels' devices, the CPU
        # kernel aside), first above the size where it takes them without
        # measuring, then forced, then below that size
        monkeypatch.setattr(fused_cpu, '_ext', None)
        monkeypatch.setattr(set_attention_module, '_TRITON_DEVICES',
                            ('cpu', ))
        monkeypatch.setattr(set_attention_module, '_MEASURED', {})
        runs = [(0, True), ('triton', True), (2**40, False)]
    for setting, fused in runs:
        calls.clear()
        with contextlib.ExitStack() as stack:
            if setting == 'triton':
                stack.enter_context(set_backend('triton'))
            elif setting is not None:
                monkeypatch.setattr(set_attention_module,
                                    'FUSED_CUDA_MIN_BYTES', setting)
                monkeypatch.setattr(set_attention_module, 'MEASURE', False)
            out = _grads(_compiled(kw)(q, v, r), (q, v, r))
        if backend == 'cpu':
            assert calls == ['forward', 'backward']
        assert bool(calls) == fused, setting
        for a, b in zip(out, ref):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), setting
    assert not set_attention_module._MEASURED

    class Layer(torch.nn.Module):
        def forward(self, q, v, r):
            return set_attention(q, v, r, **kw)

    code = torch.export.export(Layer(), (q, v, r)).graph_module \
        .print_readable(print_output=False)  # (submodules included)
    assert 'ops.mmsetformer' not in code and 'aten.exp' in code


def test_backend_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match='SeT backend must be one of'):
        with set_backend('flash'):
            pass
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    q = torch.randn(1, 1, 4, 4)
    with set_backend('triton'), pytest.raises(RuntimeError,
                                              match='inputs are on the CPU'):
        set_attention(q, q, q[0], eps=0.3, num_iters=1)
    monkeypatch.setattr(fused_cpu, '_ext', None)
    with set_backend('cpu'), pytest.raises(RuntimeError, match='cpu'):
        set_attention(q, q, q[0], eps=0.3, num_iters=1)
    # auto falls back to the reference
    y = set_attention(q, q, q[0], eps=0.3, num_iters=1)
    assert torch.isfinite(y).all()


def _measuring(monkeypatch, q, v, r, pos, **kw):
    """A fresh record of measured choices, a reference that takes 0.1 s
    longer (counting its calls), and a trial of the call (q, v, r)."""
    monkeypatch.setattr(set_attention_module, '_MEASURED', {})
    calls = []

    class SlowReference(set_attention_module._SeTFunction):
        backend = 'slow reference'

        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            time.sleep(0.1)
            return set_attention_module._SeTFunction.forward(ctx, *args)

    trial = set_attention_module._Trial(
        (q, r, v, kw['eps'], kw['num_iters'], pos, kw['sigma']))
    return SlowReference, calls, trial


def test_measured_choice_is_the_faster_once_per_size_class(monkeypatch):
    """``auto``'s measured choice (CUDA): each candidate runs the call at
    hand (forward + backward when one follows) on detached copies, the
    faster is kept for the size class; the call's inputs get no gradient
    from the trials."""
    q, v, r = _inputs(2, 2, 30, 12, 8, torch.float32, seed=5)
    tok, ref = _pos((5, 6), (3, 4), torch.float32)
    ref.requires_grad_()  # learned reference positions
    kw = dict(eps=0.3, num_iters=2, sigma=0.5)
    Slow, calls, trial = _measuring(monkeypatch, q, v, r, (tok, ref), **kw)
    fastest = set_attention_module.fastest
    Ref = set_attention_module._SeTFunction
    size = set_attention_module._size_class(q, r.shape[1])
    assert fastest((Slow, Ref), size, trial) is Ref
    assert len(calls) == 3  # a warm-up and two timed calls
    assert fastest((Slow, Ref), size, trial) is Ref
    assert len(calls) == 3  # the choice is reused
    (seen, ) = set_attention_module.measured_choices()
    assert seen['choice'] == 'reference'
    assert seen['times']['slow reference'] > 0.1
    assert (seen['dtype'], seen['d'], seen['bits'], seen['num_iters'],
            seen['lpe'], seen['backward']) == ('float32', 8, 11, 2, True,
                                               True)  # 1440 < 2**11
    assert all(t.grad is None for t in (q, v, r, ref))
    with torch.no_grad():  # forward only: another class
        assert fastest((Ref, Slow), size, trial) is Ref
    assert len(calls) == 6
    assert [c['backward'] for c in
            set_attention_module.measured_choices()] == [True, False]

    class Failing(Ref):
        backend = 'failing'

        @staticmethod
        def forward(ctx, *args):
            raise RuntimeError('out of resources')
    with pytest.warns(UserWarning, match='failing implementation failed'):
        assert fastest((Failing, Slow), size + ('other', ), trial) is Slow
    assert set_attention_module.measured_choices()[-1]['times'][
        'failing'] == float('inf')
    # not measuring (a CUDA graph being captured): the choice made, if any
    assert fastest((Slow, Ref), size, trial, measure=False) is Ref
    assert fastest((Slow, Ref), size + ('new', ), trial, measure=False) \
        is Slow
    assert len(calls) == 6 + 3  # (3 in the failing class's measuring)


def check_auto_measures(monkeypatch, device):
    """``auto`` where it considers the Triton kernels (CUDA) times them
    against the reference on the call at hand, once per size class, and
    runs the faster; with MMSETFORMER_SET_MEASURE=0 or deterministic
    algorithms it measures nothing and runs the reference."""
    m = set_attention_module
    monkeypatch.setattr(m, '_MEASURED', {})
    q, v, r = (t.detach().to(device).requires_grad_()
               for t in _inputs(1, 2, 12, 6, 8, torch.float32, seed=7))
    pos = tuple(p.to(device) for p in _pos((3, 4), (2, 3), torch.float32))
    kw = dict(eps=0.3, num_iters=3, sigma=0.6)
    chosen = []
    real = m._apply

    def spy(fn, *args):
        chosen.append(fn.backend)
        return real(fn, *args)
    monkeypatch.setattr(m, '_apply', spy)
    for _ in range(2):
        set_attention(q, v, r, pos=pos, **kw).sum().backward()
    (seen, ) = m.measured_choices()
    assert set(seen['times']) == {'reference', 'triton'}, seen
    assert seen['choice'] == min(seen['times'], key=seen['times'].get)
    assert seen['backward'] and seen['device'].startswith(device)
    # 3 trial calls per candidate, then the chosen one, twice
    assert chosen[-2:] == [seen['choice']] * 2 and len(chosen) == 6 + 2
    monkeypatch.setattr(m, '_MEASURED', {})
    monkeypatch.setattr(m, 'MEASURE', False)
    chosen.clear()
    set_attention(q, v, r, pos=pos, **kw)
    assert chosen == ['reference'] and not m.measured_choices()
    monkeypatch.setattr(m, 'MEASURE', True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        set_attention(q, v, r, pos=pos, **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    assert chosen == ['reference'] * 2 and not m.measured_choices()


def test_auto_measures_where_it_considers_triton(monkeypatch):
    """As on CUDA, here with the CPU in the Triton kernels' devices (their
    interpreter; the compiled CPU kernel unavailable): the interpreter is
    far slower, so the reference is chosen."""
    monkeypatch.setattr(fused_cpu, '_ext', None)
    monkeypatch.setattr(set_attention_module, '_TRITON_DEVICES', ('cpu', ))
    if fused_triton.why_unavailable(torch.zeros(1)):
        pytest.skip(fused_triton.why_unavailable(torch.zeros(1)))
    check_auto_measures(monkeypatch, 'cpu')


def check_auto_measures_while_compiling(monkeypatch, device, backend,
                                        prefer=None):
    """Under torch.compile (one graph), ``auto`` where it considers the
    Triton kernels measures them against the reference while dynamo traces,
    on real tensors of the traced shapes, once per size class: a class
    measured before (in eager mode too) is not measured again, and the
    graph runs the faster one with the reference's outputs and gradients.
    The trials run in fp32 also where the compiled call runs under
    autocast. With dynamic shapes it measures nothing: the reference.
    ``prefer``: {backend: time} instead of timing."""
    m = set_attention_module
    q, v, r = (t.detach().to(device).requires_grad_()
               for t in _inputs(2, 2, 20, 5, 6, torch.float32, seed=8))
    pos = tuple(p.to(device) for p in _pos((4, 5), (1, 5), torch.float32))
    kw = dict(eps=0.3, num_iters=2, pos=pos, sigma=0.5)
    ref = _run('reference', q, v, r, **kw)
    launches, timed = [], []
    _record(monkeypatch, fused_triton, '_launch', launches)
    real_timed = m._timed

    def timing(trial, fn):
        timed.append(fn.backend)
        assert not torch.is_autocast_enabled(device)
        return prefer[fn.backend] if prefer else real_timed(trial, fn)
    monkeypatch.setattr(m, '_timed', timing)

    def compiled_run(amp=False, **compile_kw):
        """Compile, run once (tracing, measuring; under bf16 autocast with
        ``amp``), then run the graph alone: (outputs and gradients,
        whether it launched Triton)."""
        torch._dynamo.reset()
        fn = torch.compile(lambda q, v, r: set_attention(q, v, r, **kw),
                           backend=backend, fullgraph=True, **compile_kw)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            _grads(fn(q, v, r), (q, v, r))
        launches.clear()
        return _grads(fn(q, v, r), (q, v, r)), bool(launches)

    for turn in range(2 if prefer else 1):
        if turn:  # the other way round
            prefer = {k: -t for k, t in prefer.items()}
        monkeypatch.setattr(m, '_MEASURED', {})
        timed.clear()
        out, triton = compiled_run(amp=not turn)
        (seen, ) = m.measured_choices()
        assert sorted(timed) == ['reference'] * 2 + ['triton'] * 2
        assert seen['backward'] and seen['device'].startswith(device)
        assert seen['choice'] == min(seen['times'], key=seen['times'].get)
        assert triton == (seen['choice'] == 'triton'), seen
        for a, b in zip(out, ref):
            assert torch.allclose(a.cpu(), b.cpu(), atol=1e-5, rtol=1e-4)
    # a choice measured in eager mode serves the compiled graph
    monkeypatch.setattr(m, '_MEASURED', {})
    set_attention(q, v, r, **kw).sum().backward()
    (seen, ) = m.measured_choices()
    timed.clear()
    assert compiled_run()[1] == (seen['choice'] == 'triton')
    assert not timed and len(m.measured_choices()) == 1
    # symbolic shapes: nothing to measure on
    monkeypatch.setattr(m, '_MEASURED', {})
    out, triton = compiled_run(dynamic=True)
    assert not triton and not timed and not m.measured_choices()


@pytest.mark.parametrize('keep', ['0', '1'])
def test_dynamic_shapes_compile_once(keep, monkeypatch):
    """torch.compile(dynamic=True) of SeT, forward + backward (the
    reference, as ``auto`` takes it under symbolic shapes; K kept or
    rebuilt in the backward, the GPU's default): a second token count
    runs the same graph, with eager's gradients. The backward's row blocks
    once made dynamo specialise n: a recompile per image size, and on
    torch 2.11 (the GPU image's) an internal error."""
    m = set_attention_module
    monkeypatch.setattr(m, 'KEEP_KERNEL', keep)
    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, v, r, pos: set_attention(q, v, r, eps=0.3, num_iters=2,
                                           pos=pos, sigma=0.5),
        backend='aot_eager', fullgraph=True, dynamic=True)
    # (sizes that no two dimensions share: dynamo's duck sizing aside)
    with set_backend('reference'), \
            torch._dynamo.config.patch(error_on_recompile=True):
        for hw in ((4, 5), (5, 7)):
            q, v, r = _inputs(2, 3, hw[0] * hw[1], 6, 8, torch.float32,
                              seed=8)
            pos = _pos(hw, (2, 3), torch.float32)
            out = _grads(fn(*(t.requires_grad_() for t in (q, v, r)), pos),
                         (q, v, r))
            ref = _run('reference', q, v, r, eps=0.3, num_iters=2, pos=pos,
                       sigma=0.5)
            for a, b in zip(out, ref):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_choice_follows_torch_export_not_is_exporting(monkeypatch):
    """On torch 2.11 (the GPU image's) dynamo folds
    ``torch.compiler.is_exporting()`` to True in every compiled graph, which
    made compiled SeTformers run the reference: SeT reads the flag that
    torch.export itself sets instead (the exporters still get the
    reference, ``test_torch_compile_keeps_the_fused_kernels``)."""
    q = torch.zeros(1, 2, 20, 8)
    fused = fused_cpu.IMPLEMENTATION if fused_cpu.available() else None
    if fused is None:
        monkeypatch.setattr(set_attention_module, '_TRITON_DEVICES',
                            ('cpu', ))
        monkeypatch.setattr(set_attention_module, 'FUSED_CUDA_MIN_BYTES', 0)
        fused = fused_triton.IMPLEMENTATION
        if fused_triton.why_unavailable(q):
            pytest.skip(fused_triton.why_unavailable(q))
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True)
    assert set_attention_module._implementation(q, 6) is fused
    monkeypatch.setattr(torch.compiler, '_is_exporting_flag', True)
    assert set_attention_module._implementation(q, 6) is \
        set_attention_module._SeTFunction


def test_auto_measures_while_compiling(monkeypatch):
    """As on CUDA, with the CPU in the Triton kernels' devices (their
    interpreter; the compiled CPU kernel unavailable) and the timings
    given, each way round."""
    if fused_triton.why_unavailable(torch.zeros(1)):
        pytest.skip(fused_triton.why_unavailable(torch.zeros(1)))
    monkeypatch.setattr(fused_cpu, '_ext', None)
    monkeypatch.setattr(set_attention_module, '_TRITON_DEVICES', ('cpu', ))
    check_auto_measures_while_compiling(monkeypatch, 'cpu', 'aot_eager',
                                        prefer={'triton': 1.,
                                                'reference': 2.})


def test_measuring_inside_activation_checkpointing(monkeypatch):
    """The trial runs inside a checkpointed region's forward: its own
    saved tensors must not go to the region's hooks, and the region's
    gradients stay the reference's."""
    from torch.utils.checkpoint import checkpoint
    q, v, r = _inputs(1, 2, 20, 6, 8, torch.float32, seed=6)
    pos = _pos((4, 5), (2, 3), torch.float32)
    kw = dict(eps=0.3, num_iters=2, sigma=0.5)
    Slow, _, _ = _measuring(monkeypatch, q, v, r, pos, **kw)
    m = set_attention_module

    def region(q, v):
        t = m._Trial((q, r, v, kw['eps'], kw['num_iters'], pos, kw['sigma']))
        fn = m.fastest((Slow, m._SeTFunction), ('class', ), t)
        assert fn is m._SeTFunction
        return m._apply(fn, q, r, v, kw['eps'], kw['num_iters'], pos,
                        kw['sigma'])

    ours = _grads(checkpoint(region, q, v, use_reentrant=False), (q, v, r))
    with set_backend('reference'):
        ref = _grads(set_attention(q, v, r, pos=pos, **kw), (q, v, r))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('backend', FUSED)
def test_no_n_by_m_tensor_kept_for_backward(backend, small_tiles):
    """What the fused paths save for the backward is O(n + m) per slice
    plus the inputs and output, never the kernel."""
    n, m, d = 60, 20, 4
    q, v, r = _inputs(1, 2, n, m, d, torch.float32, seed=4)
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    saved = []
    with _backend(backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        set_attention(q, v, r, eps=0.3, num_iters=3,
                      pos=_pos((6, 10), (4, 5), torch.float32), sigma=0.5)
    assert saved and max(map(math.prod, saved)) < 2 * n * m, saved


@pytest.mark.parametrize('backend', ['reference', 'cpu', 'triton'])
def test_layer_saves_its_output_once(backend, small_tiles):
    """y comes stored as (B, n, h, d), so the layer's head concatenation is
    a view and its output projection saves, for the backward, the tensor
    SeT saved: of the layer's saved tensors, two hold n x C values (its
    input and y), not three (a transposed copy of y besides)."""
    from mmsetformer.models import SeTAttention
    B, n, C, h = 2, 24, 15, 3  # (no other saved tensor has n x C values)
    x = torch.randn(B, n, C, requires_grad=True)
    reason = backend != 'reference' and _available(backend, x)
    if reason:
        pytest.skip(reason)
    layer = SeTAttention(C, h, num_refs=6, ref_grid=(2, 3))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with _backend(backend):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, (4, 6))
        q, v = layer._split(x, (4, 6))
        y = set_attention(q, v, layer.refs, eps=0.1, num_iters=2)
    assert y.transpose(1, 2).is_contiguous()
    assert list(saved.values()).count(x.untyped_storage().nbytes()) == 2, \
        saved


@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_backward_fills_no_zero_gradients(backend, small_tiles):
    """The operators' saved outputs never leave them, so their backward
    gets no gradients for those (no zero tensor filled per output, per
    layer). (An undefined gradient of y: test_ops' gradcheck.)"""
    from test_ops import _OpRecorder
    q, v, r = _inputs(1, 2, 20, 6, 4, torch.float32, seed=9)
    reason = _available(backend, q)
    if reason:
        pytest.skip(reason)
    impl = (fused_cpu if backend.startswith('cpu') else
            fused_triton).IMPLEMENTATION
    tok, rf = set_attention_module._ref_features(
        r, _pos((4, 5), (2, 3), torch.float32), 0.5, q.dtype, q.device)
    y = impl.apply(q, tok, rf, v, 0.3, 3)
    with _OpRecorder() as rec:
        y.sum().backward()
    ops = [name for name, _ in rec.ops]
    assert 'zeros' not in ops and 'zero_' not in ops, ops
    assert all(t.grad is not None for t in (q, v, r))


CPU_MODES = ['cpu', 'cpu-streamed', 'cpu-shared']


@pytest.mark.parametrize('backend', CPU_MODES)
@pytest.mark.parametrize('threads', [2, 3])
def test_cpu_kernel_splits_rows_when_slices_are_few(threads, backend):
    """Fewer slices than threads: each slice's passes run over row chunks
    (with per-chunk column sums): the same function."""
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    q, v, r = _inputs(1, threads - 1, 13 * 17, 30, 8, torch.float64, seed=5)
    _cpu_matches_reference(threads, q, v, r, backend, eps=0.3, num_iters=3,
                           sigma=0.6, pos=_pos((13, 17), (5, 6),
                                               torch.float64))


def _cpu_matches_reference(threads, q, v, r, backend='cpu', **kw):
    """The CPU kernel (``backend``: kept or streamed) on ``threads``
    threads against the reference, float64 outputs and gradients."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _run(backend, q, v, r, **kw)
        ref = _run('reference', q, v, r, **kw)
    finally:
        torch.set_num_threads(old)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), name


@pytest.mark.parametrize('backend', CPU_MODES)
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('num_iters', [2, 3])
def test_cpu_kernel_rescales_when_the_row_max_grows(threads, backend,
                                                    num_iters):
    """The last row scaling and the first aggregation share one sweep over
    row blocks, kept relative to a running max of a (online softmax): with
    a growing block after block, the result is still the reference's.
    Passes alternate their direction over the blocks, so the last one runs
    first to last for T = 2 (a grows along it) and last to first for
    T = 3."""
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    n, m, d = 1500, 200, 6  # float64: ~160 rows a block, ~9 blocks
    g = torch.Generator().manual_seed(6)
    r = torch.randn(1, m, d, generator=g, dtype=torch.float64)
    # rows ever closer to one reference: peakier kernel rows, larger a
    t = torch.linspace(0, 1, n, dtype=torch.float64)[:, None]
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    q = (t * r[0, :1] + (1 - t) * noise).view(1, 1, n, d).requires_grad_()
    v = torch.randn(1, 1, n, d, generator=g,
                    dtype=torch.float64).requires_grad_()
    r.requires_grad_()
    a, _ = sinkhorn_scalings(gibbs_kernel(q.detach(), r.detach(), 0.1), 3)
    assert a.argmax() > n * 3 // 4  # the max does move late
    _cpu_matches_reference(threads, q, v, r, backend, eps=0.1,
                           num_iters=num_iters)


@pytest.mark.parametrize('backend', CPU_MODES)
def test_cpu_kernel_works_in_the_layers_layouts(backend):
    """q and v as the layer makes them (views of one (B, n, 2, h, d)
    projection), upstream gradients in the layer's layout and with a
    strided last dim: the reference's outputs and gradients."""
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    B, h, hw, d, m = 2, 3, (5, 9), 7, 13
    n = hw[0] * hw[1]
    g = torch.Generator().manual_seed(11)
    qv = torch.randn(B, n, 2, h, d, generator=g, dtype=torch.float64)
    qv.requires_grad_()
    r = torch.randn(h, m, d, generator=g,
                    dtype=torch.float64).requires_grad_()
    kw = dict(eps=0.3, num_iters=2, sigma=0.6,
              pos=_pos(hw, (m, 1), torch.float64))
    gys = {  # (B, n, h*d) from the projection, and a transposed last dim
        'rows': torch.randn(B, n, h * d, generator=g, dtype=torch.float64),
        'strided': torch.randn(B, h, d, n, generator=g,
                               dtype=torch.float64).transpose(-1, -2)}
    outs = {}
    for name in (backend, 'reference'):
        for how, gy in gys.items():
            with _backend(name):
                q, v = qv.permute(2, 0, 3, 1, 4).unbind(0)
                y = set_attention(q, v, r, **kw)
            gy = gy.view(B, n, h, d).transpose(1, 2) if how == 'rows' \
                else gy
            outs[name, how] = (y.detach(),
                               *torch.autograd.grad(y, (qv, r), gy))
    for how in gys:
        for a, b in zip(outs[backend, how], outs['reference', how]):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), how


@pytest.mark.parametrize('isa', ['AVX512', 'AVX2'])
def test_cpu_builds_match_the_reference(isa, monkeypatch):
    """Every build the CPU runs (AVX-512 and AVX2 on x86; the widest is
    used) computes the reference's function, on odd shapes."""
    build = fused_cpu.builds().get(isa)
    if build is None:
        pytest.skip(f'no {isa} build runs here')
    monkeypatch.setattr(fused_cpu, '_ext', build)
    q, v, r = _inputs(2, 3, 11 * 7, 37, 13, torch.float64, seed=7)
    _cpu_matches_reference(2, q, v, r, eps=0.2, num_iters=3, sigma=0.6,
                           pos=_pos((11, 7), (37, 1), torch.float64))
    q, v, r = (t.detach().float().requires_grad_() for t in (q, v, r))
    with set_backend('cpu'):
        ours = _grads(set_attention(q, v, r, eps=0.2, num_iters=3), (q, v, r))
    ref = _run('reference', q, v, r, eps=0.2, num_iters=3)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_cpu_kernel_keeps_its_scratch_buffer_between_calls(monkeypatch):
    """The kernel's scratch memory is one buffer per thread, kept from call
    to call (forward and backward), grown to the largest; whatever it held
    before, results equal those of a fresh buffer; calls above
    ``CACHE_BYTES`` keep nothing."""
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    q, v, r = (t.detach() for t in
               _inputs(2, 3, 77, 37, 13, torch.float32, seed=8))
    kw = dict(eps=0.3, num_iters=3)

    def step():
        leaves = [t.clone().requires_grad_() for t in (q, v, r)]
        return _grads(set_attention(*leaves, **kw), leaves)

    monkeypatch.setattr(fused_cpu, 'CACHE_BYTES', 0)
    fused_cpu.empty_cache()
    fresh = step()  # every call in a buffer of its own
    assert fused_cpu.cached_bytes() == 0
    monkeypatch.setattr(fused_cpu, 'CACHE_BYTES', 2**30)
    with torch.no_grad():
        set_attention(q, v, r, **kw)
    shapes = (6, 77, 37, 13, 13, 3, fused_cpu.STREAM_BYTES,
              fused_cpu.SHARE_BYTES, 4)
    assert fused_cpu.cached_bytes() >= \
        4 * fused_cpu._ext.forward_workspace(*shapes)
    step()  # the backward's workspace is larger: the buffer grows once
    buf = fused_cpu._CACHE.buf
    assert buf.numel() >= 4 * fused_cpu._ext.backward_workspace(*shapes)
    buf.view(torch.float32).fill_(float('nan'))
    kept = step()
    assert fused_cpu._CACHE.buf is buf  # reused, not reallocated
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), kept, fresh):
        assert torch.equal(a, b), name
    fused_cpu.empty_cache()
    assert fused_cpu.cached_bytes() == 0
    # growing, the buffer is released before the larger one is allocated
    q, v, r = (t.detach() for t in
               _inputs(1, 2, 3000, 400, 16, torch.float32, seed=9))
    shapes = (2, 3000, 400, 16, 16, 3, fused_cpu.STREAM_BYTES,
              fused_cpu.SHARE_BYTES, 4)
    fwd, bwd = (4 * f(*shapes) for f in (fused_cpu._ext.forward_workspace,
                                         fused_cpu._ext.backward_workspace))
    assert bwd > fwd > 2**20
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(__file__)),
                                'tools'))
    from benchmark import peak_memory  # the allocator's events, as measured
    peak = peak_memory(step, torch.device('cpu'))
    assert bwd <= peak < bwd + fwd // 2
    fused_cpu.empty_cache()
    # no 2 MiB-aligned interior in a small buffer: nothing to advise
    assert not fused_cpu._ext.advise_huge_pages(torch.empty(4096,
                                                            dtype=torch.uint8))


def test_cpu_kernel_streamed_workspace_is_linear_in_n():
    """Streamed, the kernel's workspace holds blocks of rows, not the n x m
    kernel: growing n by 3000 rows adds O(n) elements, kept adds 3000 m."""
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    m = 750

    def ws(n, stream_bytes):
        return fused_cpu._ext.forward_workspace(1, n, m, 32, 28, 3,
                                                stream_bytes, 1 << 40, 4)
    kept = ws(4000, 1 << 40) - ws(1000, 1 << 40)
    streamed = ws(4000, 0) - ws(1000, 0)
    assert kept >= 3000 * m
    # a row's query features (dp = 32) and a few values per row
    assert streamed <= 3000 * (32 + 8)


def test_cpu_kernel_shares_the_threads_when_kernels_outgrow_the_cache():
    """One slice per thread keeps a kernel per thread; above SHARE_BYTES
    (of kernels kept at once) slices run one after the other over all
    threads, with one kernel in memory: the workspace shows which."""
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n, m = 2000, 300

        def ws(share_bytes):
            return fused_cpu._ext.forward_workspace(4, n, m, 32, 28, 3,
                                                    1 << 40, share_bytes, 4)
        assert ws(1 << 40) >= 2 * n * m  # a kernel per thread
        assert ws(2 * n * m * 4) >= 2 * n * m  # 2 kernels: not above
        assert n * m <= ws(2 * n * m * 4 - 1) < 2 * n * m  # one at a time
        assert ws(fused_cpu.SHARE_BYTES) == ws(1 << 40)  # 2 x 2.4 MB: apart
    finally:
        torch.set_num_threads(old)


def test_triton_launch_falls_back_to_shallower_pipelines(monkeypatch):
    """A GPU with less shared memory gets a shallower pipeline, remembered
    per kernel and constants, and a clear error when none fits."""
    pytest.importorskip('triton')
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(fused_triton, '_STAGES_THAT_FIT', {})
    tried = []

    class Kernel:  # fits from `fits` stages down
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **meta):
                tried.append(num_stages)
                if num_stages > self.fits:
                    raise OutOfResources(160 * 1024, 99 * 1024,
                                         'shared memory')
            return launch

    x, kernel = torch.zeros(1), Kernel(fits=1)
    fused_triton._launch(kernel, (1, ), x, BN=64)
    assert tried == [3, 2, 1]
    fused_triton._launch(kernel, (1, ), x, BN=64)  # remembered
    assert tried == [3, 2, 1, 1]
    fused_triton._launch(kernel, (1, ), x, BN=32)  # other constants
    assert tried == [3, 2, 1, 1, 3, 2, 1]
    with pytest.raises(RuntimeError, match='MMSETFORMER_TRITON_BLOCK_N'):
        fused_triton._launch(Kernel(fits=0), (1, ), x, BN=64)


def test_triton_keeps_the_kernel_up_to_its_stream_size(monkeypatch):
    """A call whose B*h*n*m kernel fits STREAM_BYTES builds it once per
    forward and once per backward, and every other pass reads it (the
    backward's last turns it into dL/dlogK); one byte less and no pass
    reads a kept kernel (the tiles are rebuilt). Both give the same
    outputs and gradients."""
    B, h, n, m = 2, 2, 30, 10
    q, v, r = _inputs(B, h, n, m, 8, torch.float32, seed=3)
    if _available('triton', q):
        pytest.skip(_available('triton', q))
    launches = _record_launches(monkeypatch)
    kw = dict(eps=0.3, num_iters=2, pos=_pos((5, 6), (2, 5), torch.float32),
              sigma=0.5)
    size = B * h * n * m * 4
    runs = {}
    for limit in (size, size - 1):
        launches.clear()
        with set_backend('triton'), fused_triton.stream_above(limit):
            runs[limit] = _grads(set_attention(q, v, r, **kw), (q, v, r))
        builds = [meta['STORE'] for name, meta in launches
                  if name == '_build']
        # (the fused Sinkhorn step reads a kept kernel only)
        passes = {meta.get('KEPT', name == '_step_pass')
                  for name, meta in launches if name != '_build'}
        steps = [name for name, _ in launches if name == '_step_pass']
        if limit == size:
            # forward: maxima and kernel; backward: the kernel again. One
            # launch per pass over K: forward the build, T steps (row and
            # column scaling in one pass), the last row scaling and the
            # two aggregations (T + 4); backward the build, the
            # aggregations' two transposes, the last scaling's, T - 1
            # reversed steps, the first step's row half and dL/dlogK
            # (T + 5)
            T = kw['num_iters']
            assert builds == [True, True] and passes == {True}, launches
            assert len(steps) == 2 * T - 1, launches
            assert len(launches) == 2 * T + 9, launches
        else:
            assert builds == [False] and passes == {False}, launches
            assert not steps, launches
    for a, b in zip(*runs.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_pre_hopper_tf32_tiles_match_reference(monkeypatch):
    """Under TF32 before Hopper the column-side matrix and gradient kernels
    own 32 references instead of 64 (their own grid and row chunks): the
    result is the same function.  (The interpreter runs every dot in
    fp32, so this checks the tiling, not TF32's rounding.)"""
    q, v, r = _inputs(2, 2, 54, 70, 8, torch.float32, seed=6)
    if _available('triton', q):
        pytest.skip(_available('triton', q))
    if not fused_triton._interpreting():
        pytest.skip('a GPU chooses its own tiles')
    monkeypatch.setattr(fused_triton, 'INTERPRETED_CC', (8, 0))
    monkeypatch.setenv('MMSETFORMER_SET_PRECISION', 'tf32x3')
    launched = _record_launches(monkeypatch)
    kw = dict(eps=0.3, num_iters=2, pos=_pos((6, 9), (7, 10), torch.float32),
              sigma=0.5)
    ours, ref = _run('triton', q, v, r, **kw), _run('reference', q, v, r, **kw)
    assert {meta['BM'] for name, meta in launched
            if name in ('_col_pass', '_grad_cols')
            and meta.get('HAS_MAT', True)} == {32}
    assert {meta['BM'] for name, meta in launched if name == '_build'} == {64}
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        tol = 1e-5 * b.abs().max().item() + 1e-7
        assert (a - b).abs().max().item() <= tol, \
            (name, (a - b).abs().max().item(), tol)


def _triton_report(ptxas: bool = True):
    """tools/triton_report.py, the ahead-of-time compiler of the kernels
    (where ``ptxas``: skips without Triton's ptxas, and on a GPU host,
    where test_cuda launches the kernels and the interpreter that records
    their launches is off)."""
    pytest.importorskip('triton')
    reason = _available('triton', torch.zeros(1))
    if ptxas and reason:
        pytest.skip(reason)
    try:
        if ptxas:
            from triton.backends.nvidia.compiler import get_ptxas
            get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 (no ptxas: cannot compile)
        pytest.skip(f'no ptxas to compile for CUDA: {e}')
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(__file__)), 'tools'))
    try:
        return importlib.import_module('triton_report')
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize('d', [28, 32, 40])
def test_triton_kernels_fit_gpus(d):
    """Every kernel launch of a forward + backward, with the tiles chosen
    for sm_80, sm_86 and sm_90 in the default precision and the heaviest
    (3xTF32), fits that GPU's shared memory within the pipelining depths
    ``_launch`` tries (else: an OutOfResources error found only on that
    GPU), and no thread spills registers inside the tile loops (a memory
    round trip per tile; ptxas may still save a value across a loop), at
    SeTformer's head dims: 28 (M, T), 32 (S) and 40 (B).  At 28 and 40 the
    4 position features ride in the dot's padding instead of element-wise
    terms."""
    report = _triton_report()
    rows = report.compile_forward_backward(d, (80, 86, 90),
                                           ('ieee', 'tf32x3'))
    for cc in (80, 86, 90):
        for prec in ('ieee', 'tf32x3'):  # (the fused step has no dot)
            assert {r['kernel'] for r in rows if r['cc'] == cc and
                    r['meta'].get('PREC', prec) == prec} == {
                '_build', '_row_pass', '_col_pass', '_step_pass',
                '_grad_rows', '_grad_cols'}, (cc, prec)
    # (the fused reverse step of the backward too)
    assert {r['meta']['GRAD'] for r in rows
            if r['kernel'] == '_step_pass'} == {False, True}
    for r in rows:
        assert r['meta'].get('KP', 4 if d == 32 else 0) == (
            4 if d == 32 else 0), r
        assert r['shared'] <= report.SHARED_LIMIT[r['cc']], r
        assert r['loops'] > 0 and r['fma'] + r['mma'] > 0, r
        assert r['loop_local_ops'] == 0, r


def test_triton_float64_kernels_compile_for_gpus():
    """The float64 launches (the CUDA tests hold the kernels to the dense
    float64 reference with them) compile for sm_80 and sm_90, whose fp64
    tensor cores their dots use, and fit those GPUs' shared memory; the
    interpreter never compiles, so a GPU would be the first to find that
    they do not."""
    report = _triton_report()
    rows = report.compile_forward_backward(28, (80, 90), ('fp64', ))
    assert {r['kernel'] for r in rows} == {
        '_build', '_row_pass', '_col_pass', '_step_pass', '_grad_rows',
        '_grad_cols'}
    for r in rows:
        # (a kept kernel's passes with a vector alone have no dot)
        dot = r['kernel'] != '_step_pass' and (
            r['meta'].get('HAS_MAT', True) or not r['meta'].get('KEPT'))
        assert r['ptr'] == 'fp64' and (r['mma'] > 0) == dot, r
        assert r['shared'] <= report.SHARED_LIMIT[r['cc']], r


def test_tf32_inputs_emulated_3xtf32_as_accurate_as_fp32():
    """tl.dot's TF32 inputs, emulated under the interpreter (which runs
    every dot in fp32): plain TF32 moves SeT's output and gradients by
    ~1e-3 of their scale (the logits carry 1/eps), the 3xTF32 split keeps
    fp32's error; the figures a TF32 default would rest on, besides a GPU's
    timing."""
    report = _triton_report(ptxas=False)
    q = torch.zeros(1, dtype=torch.float32)
    if _available('triton', q) or not fused_triton._interpreting():
        pytest.skip('emulates TF32 under the interpreter only')
    errs = report.emulated_errors(n_side=(7, 9), grid=(5, 6))
    for k, e in errs['ieee'].items():
        assert e < 1e-5, errs
        assert errs['tf32x3'][k] < 5 * e + 1e-6, errs
        assert errs['tf32'][k] > 30 * e, errs
