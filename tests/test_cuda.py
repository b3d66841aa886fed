"""SeT on CUDA (skipped without a GPU): the reference and the Triton kernels
against the dense float64 reference, and the Triton kernels' TF32 error."""
import pytest
import torch
from dense_reference import dense_set
from test_fused import _backend, _grads, _run

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


# 'triton-streamed': the Triton kernels rebuilding K's tiles in every pass
# (by default only above fused_triton.STREAM_BYTES), see test_fused._backend
TRITON_MODES = ['triton', 'triton-streamed']


@pytest.mark.parametrize('backend', ['reference', 'auto'] + TRITON_MODES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_matches_dense_float64_on_cuda(backend, dtype):
    dev, host, pos = _case(dtype)
    kw = dict(eps=0.3, num_iters=3, sigma=0.6)
    with _backend(backend):
        ours = _grads(set_attention(
            *dev, pos=tuple(p.to('cuda', dtype) for p in pos), **kw), dev)
    ref = _grads(dense_set(*host, pos=pos, **kw)[0], host)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        err = (a.double().cpu() - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), (name, err)


def test_auto_measures_once_per_size_class_on_cuda(monkeypatch):
    from test_fused import check_auto_measures
    check_auto_measures(monkeypatch, 'cuda')


def test_auto_measures_while_compiling_on_cuda(monkeypatch):
    # (AOTAutograd's graphs without inductor's code generation: three
    # compiles, kept short; test_inductor_keeps_the_triton_kernels has
    # inductor)
    from test_fused import check_auto_measures_while_compiling
    check_auto_measures_while_compiling(monkeypatch, 'cuda', 'aot_eager')


def test_inductor_keeps_the_triton_kernels():
    """torch.compile (inductor, one graph) around SeT with the Triton
    kernels forced: they run as the operators they are registered as, with
    the float64 dense reference's outputs and gradients (the CPU tests
    check the routing under dynamo)."""
    dev, host, pos = _case(torch.float32)
    kw = dict(eps=0.3, num_iters=3, pos=tuple(p.cuda().float() for p in pos),
              sigma=0.6)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, v, r: set_attention(q, v, r, **kw),
                       fullgraph=True)
    with set_backend('triton'):
        ours = _grads(fn(*dev), dev)
    kw['pos'] = pos
    ref = _grads(dense_set(*host, **kw)[0], host)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        err = (a.double().cpu() - b).abs().max().item()
        assert err <= 1e-5 * (1 + b.abs().max().item()), (name, err)


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


# -- the Triton kernels on the GPU: the CPU suite's cases and extremes ------
def _cuda(ts):
    return [t.detach().cuda().requires_grad_() for t in ts]


def _kw(hw, grid, T, eps, sigma, lpe, dtype):
    from test_fused import _pos
    pos = tuple(p.cuda() for p in _pos(hw, grid, dtype)) if lpe else None
    return dict(eps=eps, num_iters=T, pos=pos, sigma=sigma if lpe else None)


@pytest.mark.parametrize('mode', TRITON_MODES)
@pytest.mark.parametrize('tiles', [16, None])
@pytest.mark.parametrize('case', range(6))
def test_triton_matches_dense_float64_cases(case, tiles, mode, monkeypatch):
    from test_fused import CASES, _inputs, _pos

    from mmsetformer.ops import fused_triton
    if tiles:  # several row and reference tiles even on tiny inputs
        monkeypatch.setattr(fused_triton, 'BLOCK_N', tiles)
        monkeypatch.setattr(fused_triton, 'BLOCK_M', tiles)
    B, h, hw, grid, d, T, eps, sigma, lpe = CASES[case]
    n = hw if isinstance(hw, int) else hw[0] * hw[1]
    m = grid if isinstance(grid, int) else grid[0] * grid[1]
    host = _inputs(B, h, n, m, d, torch.float64)
    ours = _run(mode, *_cuda(host),
                **_kw(hw, grid, T, eps, sigma, lpe, torch.float64))
    kw = dict(eps=eps, num_iters=T, pos=_pos(hw, grid, torch.float64)
              if lpe else None, sigma=sigma if lpe else None)
    ref = _grads(dense_set(*host, **kw)[0], host)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        err = (a.cpu() - b).abs().max().item()
        assert err <= 1e-9 * (1 + b.abs().max().item()), (name, err)


@pytest.mark.parametrize('mode', TRITON_MODES)
@pytest.mark.parametrize('scale,eps,zeros', [
    (1e-4, 0.3, False), (1e4, 0.3, False), (1.0, 0.01, False),
    (1.0, 0.3, True)])
def test_triton_extremes_match_reference_on_cuda(scale, eps, zeros, mode):
    from test_fused import _inputs
    q, v, r = _cuda(_inputs(2, 2, 40, 12, 8, torch.float32, seed=2,
                            scale=scale))
    if zeros:
        with torch.no_grad():
            q[:, :, :6] = 0
            r[:, 0] = 0
    kw = _kw((5, 8), (3, 4), 3, eps, 0.5, True, torch.float32)
    ours = _run(mode, q, v, r, **kw)
    ref = _run('reference', q, v, r, **kw)
    for name, a, b in zip(('y', 'dq', 'dv', 'drefs'), ours, ref):
        assert torch.isfinite(a).all(), name
        tol = 1e-4 * b.abs().max().item() + 1e-6
        assert (a - b).abs().max().item() <= tol, \
            (name, (a - b).abs().max().item(), tol)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_inputs_stay_accurate_on_cuda(dtype):
    """Half inputs under autocast: the fused path accumulates in fp32, so
    it is as close to the float64 result as the half inputs allow."""
    dev, host, pos = _case(torch.float32, n_side=(28, 28), grid=(10, 10),
                           d=32, B=2, h=2)
    kw = dict(eps=0.1, num_iters=3, sigma=0.5)
    halves = [t.detach().to(dtype) for t in dev]
    with torch.autocast('cuda', dtype=dtype), set_backend('triton'):
        y = set_attention(*halves, pos=tuple(p.cuda() for p in pos), **kw)
    exact = dense_set(*(t.detach().to(dtype).double().cpu() for t in dev),
                      pos=pos, **kw)[0]
    assert y.dtype == dtype  # the output follows v
    err = (y.double().cpu() - exact).abs().max().item()
    # one rounding of the output to the half type, nothing more
    assert err <= 2 * torch.finfo(dtype).eps * exact.abs().max().item(), err


def test_triton_memory_on_cuda():
    """Peak memory of forward + backward at n = 50176: doubling m adds far
    less than one more B*h*n*m fp32 buffer with the streamed Triton kernels
    (their workspace is O(n d + m d)); about one with the kept ones (one
    kernel alive at a time); several with the reference."""
    from mmsetformer.ops import reference_grid
    B, h, side, d = 1, 2, 224, 32
    n = side * side
    g = torch.Generator(device='cuda').manual_seed(0)
    q, v = (torch.randn(B, h, n, d, device='cuda', generator=g)
            for _ in range(2))
    peaks = {}
    for m in (375, 750):
        r = torch.randn(h, m, d, device='cuda', generator=g)
        pos = (grid_positions(side, side, device='cuda'),
               grid_positions(*reference_grid(m), device='cuda'))
        for backend in TRITON_MODES + ['reference']:
            q_, v_, r_ = (t.clone().requires_grad_() for t in (q, v, r))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with _backend(backend):
                y = set_attention(q_, v_, r_, eps=0.1, num_iters=3, pos=pos,
                                  sigma=0.5)
            y.square().mean().backward()
            torch.cuda.synchronize()
            peaks[backend, m] = torch.cuda.max_memory_allocated() - base
    extra_kernel = B * h * n * 375 * 4  # what doubling m adds to one K
    grow = {b: peaks[b, 750] - peaks[b, 375]
            for b in TRITON_MODES + ['reference']}
    assert grow['triton-streamed'] < 0.25 * extra_kernel, (grow, peaks)
    assert grow['triton'] < 1.5 * extra_kernel, (grow, peaks)
    assert grow['reference'] > max(extra_kernel, grow['triton']), \
        (grow, peaks)  # can fail


# -- no host-device synchronisation ------------------------------------------
def _runs_without_syncing(step):
    """``step`` after a warm-up call (the kernels compile there), with any
    host-device synchronisation an error: an ``.item()``, a host copy or a
    data-dependent shape inside a layer would stall the CPU until the GPU
    drains, once per layer, and leave the GPU idle while it launches the
    rest."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()


@pytest.mark.parametrize('backend', ['reference'] + TRITON_MODES)
def test_set_forward_and_backward_never_sync(backend):
    dev, _, pos = _case(torch.float32)
    pos = tuple(p.to('cuda', torch.float32) for p in pos)

    def step():
        with _backend(backend):
            y = set_attention(*dev, pos=pos, eps=0.3, num_iters=3, sigma=0.6)
        y.square().mean().backward()
    _runs_without_syncing(step)


@pytest.mark.parametrize('backend', ['auto', 'triton'])
def test_setformer_training_step_never_syncs(backend):
    from mmsetformer.models import SeTformer
    model = SeTformer('t', num_refs=64, drop_path_rate=0.1).cuda().train()
    x = torch.randn(2, 3, 128, 160, device='cuda')

    def step():
        with set_backend(backend):
            loss = sum(o.float().square().mean() for o in model(x))
        loss.backward()
    _runs_without_syncing(step)


# -- whole models on CUDA: AMP training steps and inference ----------------
def _det_batch(batch=2, shape=(256, 320)):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=batch, image_shapes=[(3, *shape)] * batch,
                          num_items=[3] * batch, num_classes=80,
                          with_mask=True)


def _seg_batch(batch=2, shape=(256, 320), num_classes=150):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, *shape), generator=g,
                            dtype=torch.uint8) for _ in range(batch)]
    samples = []
    for _ in range(batch):
        s = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape,
                                        pad_shape=shape, scale_factor=(1, 1)))
        s.gt_sem_seg = PixelData(data=torch.randint(
            0, num_classes, (1, *shape), generator=g))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


MODELS_ON_CUDA = [
    ('mask_rcnn_setformer_t_amp_3x.py', _det_batch),
    ('cascade_mask_rcnn_setformer_t_amp_3x.py', _det_batch),
    ('upernet_setformer_t_160k.py', _seg_batch),
]


@pytest.mark.parametrize('config,batch', MODELS_ON_CUDA)
def test_model_amp_training_and_inference_on_cuda(config, batch, root):
    import os.path as osp

    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    from mmsetformer.apis import build_model
    cfg = Config.fromfile(osp.join(root, 'configs', config))
    cfg.model.backbone.pop('init_cfg', None)
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    wrapper_cfg = cfg.optim_wrapper.copy()
    if wrapper_cfg.get('type', 'OptimWrapper') != 'AmpOptimWrapper':
        wrapper_cfg.update(type='AmpOptimWrapper', loss_scale='dynamic')
    assert wrapper_cfg['loss_scale'] == 'dynamic'
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    model.train()
    for _ in range(3):  # the real path: data_preprocessor, autocast, step
        log_vars = model.train_step(batch(), wrapper)
        assert all(torch.isfinite(torch.as_tensor(v)).all()
                   for v in log_vars.values()), log_vars
    # one more step by hand, to look at the unscaled gradients
    data = model.data_preprocessor(batch(), True)
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cuda')
        losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    wrapper.backward(loss)
    wrapper.loss_scaler.unscale_(wrapper.optimizer)
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and (p.grad is None
                                   or not torch.isfinite(p.grad).all())]
    assert not bad, bad[:10]
    assert wrapper.loss_scaler.get_scale() > 0
    wrapper.zero_grad()
    model.eval()
    with torch.no_grad():
        preds = model.test_step(batch())
        with torch.autocast('cuda', dtype=torch.float16):
            preds16 = model.test_step(batch())
    assert len(preds) == len(preds16) == 2
    for p in preds + preds16:
        field = p.pred_instances.bboxes if hasattr(p, 'pred_instances') \
            else p.pred_sem_seg.data
        assert field.is_cuda or field.device.type == 'cpu'
        assert torch.isfinite(field.float()).all()


def test_dist_train_one_process_nccl(root, tmp_path):
    """tools/dist_train.sh with one GPU: NCCL (not the CPU's gloo), the
    Mask R-CNN shapes recipe, a checkpoint at the end."""
    import os
    import subprocess
    import sys

    from shrink import det_config

    from mmsetformer.data.shapes import generate
    data = str(tmp_path / 'shapes')
    generate(data, num_train=8, num_val=4, size=(128, 160),
             num_cls_per_class=(6, 2), cls_size=56, seed=0,
             log=lambda *_: None)
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(det_config(data, epochs=1,
                              base='mask_rcnn_setformer_nano_shapes_demo.py'))
    work = tmp_path / 'work'
    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh', str(cfg), '1', '--work-dir',
         str(work)], cwd=root, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHON=sys.executable, PORT='29561'))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'backend set to gloo' not in log
    assert "backend='nccl'" in log or '"backend": "nccl"' in log, log[-3000:]
    assert (work / 'epoch_1.pth').is_file(), log[-3000:]
