"""After training (issue: timm conformance, every parameter trained under
DDP): every shipped model trains under DDP without
``find_unused_parameters``, the timm models pass timm's model checks
(torch.fx tracing and fx feature extraction, torch.jit.trace, timm's model
API), torch.compile makes one graph of them, and torch.jit.script is
refused clearly."""
import os.path as osp

import pytest
import timm
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from shrink import ROOT, TINY_ARCH, TINY_DIMS, det_config, seg_config
from test_fused import _record
from torch.nn.parallel import DistributedDataParallel as DDP

import mmsetformer  # noqa: F401  (registers)
from mmsetformer.apis import build_model
from mmsetformer.checkpoint import checkpoint_filter_fn
from mmsetformer.timm_models import SeTformerClassifier

TINY = dict(arch=TINY_ARCH, num_refs=16, drop_path_rate=0.1)


def _tiny_classifier(**kwargs):
    torch.manual_seed(0)
    return SeTformerClassifier(num_classes=5, **TINY, **kwargs)


def _no_grad(model):
    return [n for n, p in model.named_parameters()
            if p.requires_grad and p.grad is None]


# -- every parameter trains under DDP (no find_unused_parameters) ----------
@pytest.fixture(scope='module')
def process_group(tmp_path_factory):
    """A one-process gloo group: enough for DDP's reducer to refuse
    parameters that take no part in the loss."""
    init = tmp_path_factory.mktemp('pg') / 'init'
    dist.init_process_group('gloo', init_method=f'file://{init}', rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _config(text, tmp_path, name):
    path = tmp_path / f'{name}.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.pop('init_cfg', None)
    return cfg


def _cascade_config():
    cfg = Config.fromfile(osp.join(ROOT, 'configs',
                                   'cascade_mask_rcnn_setformer_t_3x.py'))
    m = cfg.model
    m.backbone = dict(type='SeTformer', **TINY)
    m.neck.update(in_channels=TINY_DIMS, out_channels=32)
    m.rpn_head.update(in_channels=32, feat_channels=32)
    roi = m.roi_head
    for ext in (roi.bbox_roi_extractor, roi.mask_roi_extractor):
        ext.out_channels = 32
    for head in roi.bbox_head:
        head.update(in_channels=32, conv_out_channels=16, fc_out_channels=32,
                    num_classes=3)
    roi.mask_head.update(in_channels=32, conv_out_channels=16, num_classes=3)
    return cfg


def _det_batch():
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(2, [(3, 96, 128), (3, 80, 112)], num_items=[3, 2],
                          num_classes=3, with_mask=True)


def _seg_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(64, 64),
                                        ori_shape=(64, 64),
                                        pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, 64, 64)))
        samples.append(s)
    return dict(inputs=[torch.randint(0, 256, (3, 64, 64)).to(torch.uint8)
                        for _ in samples], data_samples=samples)


def _cls_batch():
    from mmpretrain.structures import DataSample
    return dict(inputs=[torch.randint(0, 256, (3, 48, 48)).to(torch.uint8)
                        for _ in range(4)],
                data_samples=[DataSample().set_gt_label(i % 3)
                              for i in range(4)])


def _mm_models(tmp_path):
    """Shrunken copies of the shipped recipes, with a batch of their kind.
    """
    from shrink import cls_config
    root = str(tmp_path)
    yield 'Mask R-CNN', _config(det_config(root), tmp_path,
                                'mask_rcnn'), _det_batch
    yield 'Cascade Mask R-CNN', _cascade_config(), _det_batch
    yield 'UperNet', _config(seg_config(root), tmp_path, 'upernet'), \
        _seg_batch
    cls = _config(cls_config(root), tmp_path, 'cls')
    # one image per class per batch is too few for the recipe's mixing
    cls.model.train_cfg = None
    yield 'mmpretrain classifier', cls, _cls_batch


def _ddp_steps(model, loss_fn):
    """A training step under DDP without find_unused_parameters, and the
    next forward pass (where DDP raises if a parameter took no part in the
    step); the parameters without a gradient."""
    ddp = DDP(model, find_unused_parameters=False, broadcast_buffers=False)
    loss = loss_fn(ddp)
    assert torch.isfinite(loss)
    loss.backward()
    missing = _no_grad(model)
    loss_fn(ddp)
    return missing


def test_every_shipped_model_trains_under_ddp(process_group, tmp_path):
    for name, cfg, batch in _mm_models(tmp_path):
        torch.manual_seed(0)
        # DDP refuses SyncBN (Cascade's heads) on CPU modules
        model = revert_sync_batchnorm(build_model(cfg))
        model.init_weights()
        model.train()
        n_params = sum(1 for p in model.parameters() if p.requires_grad)

        def loss_fn(ddp, model=model, batch=batch):
            data = model.data_preprocessor(batch(), True)
            losses = ddp(**data, mode='loss')
            return model.parse_losses(losses)[0]

        missing = _ddp_steps(model, loss_fn)
        assert missing == [], f'{name}: no gradient for {missing}'
        assert n_params > 50, name


def test_timm_classifier_trains_under_ddp(process_group):
    model = timm.create_model('setformer_m', num_classes=5, **TINY)
    x = torch.randn(2, 3, 64, 64)
    missing = _ddp_steps(model, lambda ddp: ddp(x).logsumexp(-1).mean())
    assert missing == []
    # the classifier owns the output norm of the stage its head reads
    norms = {n.split('.')[1] for n, _ in model.named_parameters()
             if n.startswith('backbone.norm')}
    assert norms == {'norm3'}


def test_classifier_configs_return_only_the_last_stage():
    # the t recipe trains above; the others inherit its backbone
    def text(v):
        with open(osp.join(ROOT, 'configs', f'setformer_{v}_in1k.py')) as f:
            return f.read()

    assert 'out_indices=(3, )' in text('t')
    for v in 'msb':
        assert "_base_ = ['./setformer_t_in1k.py']" in text(v)
        assert 'out_indices' not in text(v)


# -- torch.fx ---------------------------------------------------------------
def test_fx_symbolic_trace_matches_eager_and_trains():
    model = _tiny_classifier().eval()
    gm = torch.fx.symbolic_trace(model)
    # the SeT operator, the input check and the stem/down-sampler convs are
    # leaves: one call each in the graph
    targets = [n.target.__name__ for n in gm.graph.nodes
               if n.op == 'call_function' and hasattr(n.target, '__name__')]
    assert targets.count('set_op') == sum(TINY_ARCH['depths'])
    assert targets.count('_check_images') == 1
    for hw in [(64, 64), (48, 80)]:  # any size runs through the graph
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))
    with pytest.raises(ValueError, match='expects 3 input channels'):
        gm(torch.randn(1, 1, 32, 32))  # the checks run in the graph
    model.train()
    gm = torch.fx.symbolic_trace(model)
    gm(torch.randn(2, 3, 64, 64)).mean().backward()
    assert _no_grad(gm) == []


def test_timm_fx_feature_extraction():
    from timm.models import create_feature_extractor
    kw = dict(features_only=True, out_indices=(1, 2, 3), **TINY)
    fx = timm.create_model('setformer_m', feature_cls='fx', **kw).eval()
    getter = timm.create_model('setformer_m', **kw).eval()
    getter.model.load_state_dict(
        {k[len('graph_module.'):]: v for k, v in fx.state_dict().items()})
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = fx(x), getter(x)
    assert fx.feature_info.channels() == TINY_DIMS[1:]
    assert [tuple(o.shape) for o in a] == [(1, 32, 8, 12), (1, 64, 4, 6),
                                           (1, 128, 2, 3)]
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-5)
    # timm's node-name extraction on a classifier
    clf = _tiny_classifier().eval()
    ext = create_feature_extractor(clf, {'backbone.norm3': 'out'})
    with torch.no_grad():
        assert torch.equal(ext(x)['out'], clf.forward_features(x))


# -- TorchScript: trace yes, script no --------------------------------------
def test_jit_trace_runs_other_sizes_and_script_is_refused():
    model = _tiny_classifier().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64),
                                 check_trace=False)
        x = torch.randn(1, 3, 48, 80)
        assert torch.allclose(traced(x), model(x), atol=1e-5)
    with pytest.raises(RuntimeError, match='cannot be compiled with '
                       'torch.jit.script.*torch.jit.trace'):
        torch.jit.script(model)


# -- torch.compile: one graph, the fused kernels kept -----------------------
def test_torch_compile_one_graph_keeps_the_fused_kernel(monkeypatch):
    """The whole classifier compiles to one graph (no graph break at the
    SeT layers) that runs the compiled CPU kernel, not the reference the
    tracer would otherwise see, with eager's outputs and gradients."""
    from mmsetformer.ops import fused_cpu
    if not fused_cpu.available():
        pytest.skip(fused_cpu.why_unavailable())
    # (eval: drop path's draws would differ between the runs)
    model, x = _tiny_classifier().eval(), torch.randn(2, 3, 64, 64)
    eager = model(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    _record(monkeypatch, fused_cpu._ext, 'forward', calls)
    torch._dynamo.reset()
    out = torch.compile(model, backend='aot_eager', fullgraph=True)(x)
    out.square().sum().backward()
    assert len(calls) == sum(TINY_ARCH['depths'])
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-4)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)


# -- timm's model API ---------------------------------------------------------
def test_forward_intermediates_and_features_only_agree():
    clf = _tiny_classifier().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, inter = clf.forward_intermediates(x)
        assert torch.equal(final, clf.forward_features(x))
        only = clf.forward_intermediates(x, indices=[0, 2],
                                         intermediates_only=True)
        _, early = clf.forward_intermediates(x, indices=2, stop_early=True)
    assert [tuple(t.shape) for t in inter] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(TINY_DIMS, (4, 8, 16, 32))]
    assert torch.equal(only[0], inter[0]) and torch.equal(only[1], inter[2])
    assert len(early) == 2 and torch.equal(early[1], inter[3])
    # a features model given the classifier's weights (timm's filter fills
    # the norms the classifier lacks) returns the same maps, and the
    # classifier takes a features model's or a detector's weights
    feats = _tiny_classifier(feature_indices=(0, 1, 2, 3)).eval()
    feats.load_state_dict(checkpoint_filter_fn(
        {'state_dict': clf.state_dict()}, feats))
    with torch.no_grad():
        for p, q in zip(feats.forward_intermediates(
                x, intermediates_only=True), inter):
            assert torch.allclose(p, q, atol=1e-5)
    feats.head.fc.weight.data += 1
    clf.load_state_dict(checkpoint_filter_fn(feats.state_dict(), clf))
    assert torch.equal(clf.head.fc.weight, feats.head.fc.weight)


def test_timm_api_heads_pooling_and_checkpointing():
    model = _tiny_classifier().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.set_grad_checkpointing()
        assert all(b.with_cp for s in model.backbone.stages
                   for b in s.blocks)
        assert torch.allclose(model(x), logits, atol=1e-5)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == (2, 128)
        assert torch.equal(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == (2, 128, 2, 2)
        model.reset_classifier(3, 'avg')
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        model.reset_classifier(3, 'max')
    assert model.get_classifier() is model.head.fc
    assert model.no_weight_decay() == {
        n for n, _ in model.named_parameters() if n.endswith('.refs')}
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, 'adamw', weight_decay=0.05,
                              layer_decay=0.8)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_groups = {g['weight_decay'] for g in opt.param_groups
                  for p in g['params'] if names[id(p)].endswith('.refs')}
    assert ref_groups == {0.}
    assert len({g['lr_scale'] for g in opt.param_groups}) > 3


def test_features_only_prunes_what_it_does_not_use():
    feats = timm.create_model('setformer_m', features_only=True,
                              out_indices=(0, 2), **TINY)
    bb = feats.model.backbone
    assert len(bb.stages) == 3 and bb.out_indices == (0, 2)
    assert not hasattr(bb, 'norm3') and not hasattr(bb, 'norm1')
    outs = feats(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in outs).backward()
    assert _no_grad(feats) == []
