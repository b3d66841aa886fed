"""SeTformer backbone: shapes, variants, training switches, loading and
registrations (issue: SeTformer backbones M/T/S/B)."""
import importlib
import math

import pytest
import torch
from mmengine.config import ConfigDict
from test_fused import _record

import mmsetformer  # noqa: F401  (registers)
from mmsetformer.models import SeTformer

SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4])
SMALL_KW = dict(arch=SMALL, num_refs=12, eps=0.3, sigma=0.8)

# Paper Table 1 (M parameters, ImageNet-1K with a 1000-class head, m=500).
PAPER_PARAMS = dict(m=16.2, t=22.3, s=35.0, b=56.7)
PAPER_DEPTHS = dict(m=[3, 4, 6, 5], t=[3, 4, 18, 5], s=[3, 4, 18, 5],
                    b=[3, 4, 18, 5])


def _params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('variant', ['m', 't', 's', 'b'])
def test_variant_params_and_depths_match_paper_table(variant):
    model = SeTformer(variant, num_refs=500, out_indices=(3, ))
    dims = model.embed_dims[-1]
    total = (_params(model) + dims * 1000 + 1000) / 1e6  # + linear head
    assert abs(total / PAPER_PARAMS[variant] - 1) <= 0.03, total
    assert model.arch_settings['depths'] == PAPER_DEPTHS[variant]


@pytest.mark.parametrize('alias,name', [('miny', 'm'), ('tiny', 't'),
                                        ('small', 's'), ('base', 'b')])
def test_aliases(alias, name):
    assert SeTformer.arch_zoo[alias] == SeTformer.arch_zoo[name]


@pytest.mark.parametrize('variant', ['m', 't', 's', 'b'])
@pytest.mark.parametrize('hw', [(224, 224), (33, 47)])
def test_output_shapes_every_variant(variant, hw):
    model = SeTformer(variant, num_refs=64).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert len(outs) == 4
    for i, (o, c) in enumerate(zip(outs, model.embed_dims)):
        s = 4 * 2**i
        assert o.shape == (1, c, math.ceil(hw[0] / s), math.ceil(hw[1] / s))
        assert torch.isfinite(o).all()


@pytest.mark.parametrize('hw', [(257, 383), (800, 1333), (33, 47), (5, 3)])
def test_any_input_size_gives_ceil_strides(hw):
    model = SeTformer(**SMALL_KW).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in (4, 8, 16, 32)
    ]


def test_out_indices_honoured():
    model = SeTformer(**SMALL_KW, out_indices=(1, 3)).eval()
    outs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    assert SeTformer(**SMALL_KW, out_indices=(-1, )).out_indices == (3, )


def _train_step(model, steps=1):
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        outs = model(torch.randn(2, 3, 32, 32))
        sum(o.square().mean() for o in outs).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize('frozen', [0, 2, 3])
def test_frozen_stages_really_freeze(frozen):
    model = SeTformer(**SMALL_KW, frozen_stages=frozen, norm_cfg=dict(
        type='BN'))
    frozen_mods = [model.stem] + [model.stages[i] for i in range(frozen)] \
        + [getattr(model, f'norm{i}') for i in range(frozen)]
    live_mods = [model.stages[i] for i in range(frozen, 4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    _train_step(model, 2)
    after = model.state_dict()
    for mod in frozen_mods:
        assert not mod.training
        for p in mod.parameters():
            assert not p.requires_grad and p.grad is None
    frozen_keys = {k for k in before for mod_name in
                   ['stem'] + [f'stages.{i}.' for i in range(frozen)]
                   + [f'norm{i}.' for i in range(frozen)]
                   if k.startswith(mod_name)}
    for k in frozen_keys:  # weights and BN statistics unchanged
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k not in frozen_keys
               and not torch.equal(before[k], after[k])]
    assert live_mods == [] or changed  # the rest does train


def test_norm_eval_keeps_norms_in_eval():
    model = SeTformer(**SMALL_KW, norm_eval=True, norm_cfg=dict(type='BN'))
    model.train()
    norms = [m for m in model.modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))]
    assert norms and all(not m.training for m in norms)
    assert model.stages[0].blocks[0].attn.training  # the rest trains
    bn = model.stem[1]
    stats = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(stats, bn.running_mean)


def test_layers_share_positions_within_a_forward(monkeypatch):
    """The SeT layers of a stage use the same token and reference
    positions and LPE features, built once per shape in a forward pass
    (not once per layer), with the outputs and gradients of building them
    in every layer."""
    sa = importlib.import_module('mmsetformer.ops.set_attention')
    built = []
    _record(monkeypatch, sa, '_position_features', built)
    torch.manual_seed(0)
    model = SeTformer(dict(embed_dims=16, depths=[2, 3, 2, 2],
                           num_heads=[1, 2, 2, 4]), num_refs=12,
                      drop_path_rate=0.)
    x = torch.randn(2, 3, 64, 96)
    outs = [model(x)]
    grads = [torch.autograd.grad(sum(o.square().sum() for o in outs[0]),
                                 list(model.parameters()))]
    assert len(built) == 4  # one token grid per stage
    monkeypatch.setattr(sa, '_memo', lambda key, make, *tensors: make())
    outs.append(model(x))
    grads.append(torch.autograd.grad(
        sum(o.square().sum() for o in outs[1]), list(model.parameters())))
    assert len(built) == 4 + 9  # every layer
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert torch.equal(a, b)


def test_with_cp_same_outputs_and_grads():
    torch.manual_seed(0)
    a = SeTformer(**SMALL_KW, drop_path_rate=0.)
    b = SeTformer(**SMALL_KW, drop_path_rate=0., with_cp=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 40, 36)
    outs = [m(x) for m in (a, b)]
    for oa, ob in zip(*outs):
        assert torch.allclose(oa, ob, atol=1e-6)
    for m, o in zip((a, b), outs):
        sum(t.square().sum() for t in o).backward()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), na


def _build(lib, cfg):
    import importlib
    registry = importlib.import_module(f'{lib}.registry')
    from mmengine.registry import DefaultScope
    scope = {'mmpretrain': 'mmpretrain', 'mmdet': 'mmdet',
             'mmseg': 'mmseg'}[lib]
    with DefaultScope.overwrite_default_scope(scope):
        return registry.MODELS.build(cfg)


@pytest.mark.parametrize('lib', ['mmpretrain', 'mmdet', 'mmseg'])
def test_build_through_each_registry(lib):
    model = _build(lib, dict(type='SeTformer', **SMALL_KW))
    assert isinstance(model, SeTformer)
    assert len(model(torch.randn(1, 3, 32, 32))) == 4


def test_timm_create_model_classifier_and_features():
    import timm
    for v in 'mtsb':
        assert f'setformer_{v}' in timm.list_models('setformer_*')
    model = timm.create_model('setformer_m', num_classes=7, num_refs=16)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    feats = timm.create_model('setformer_m', features_only=True,
                              out_indices=(0, 2), num_refs=16)
    outs = feats(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 56, 16, 24),
                                              (1, 224, 4, 6)]
    assert feats.feature_info.reduction() == [4, 16]
    assert feats.feature_info.channels() == [56, 224]


def _classifier_cfg(num_refs):
    return ConfigDict(
        type='ImageClassifier',
        backbone=dict(type='SeTformer', arch=SMALL, num_refs=num_refs,
                      out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=128,
                  loss=dict(type='CrossEntropyLoss')))


def _mask_rcnn_cfg(ckpt, num_refs):
    import os

    import mmdet
    from mmengine.config import Config
    base = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                        '_base_', 'models', 'mask-rcnn_r50_fpn.py')
    cfg = Config.fromfile(base).model
    cfg.backbone = dict(
        type='SeTformer', arch=SMALL, num_refs=num_refs,
        init_cfg=dict(type='Pretrained', checkpoint=ckpt,
                      prefix='backbone.'))
    cfg.neck.in_channels = [16, 32, 64, 128]
    return cfg


@pytest.mark.parametrize('det_refs', [12, 20])
def test_classifier_checkpoint_loads_into_mask_rcnn(tmp_path, det_refs):
    import logging

    from mmengine.logging import MMLogger
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    torch.manual_seed(0)
    clf = _build('mmpretrain', _classifier_cfg(12))
    ckpt = str(tmp_path / 'clf.pth')
    torch.save({'state_dict': clf.state_dict(), 'meta': {'epoch': 3}}, ckpt)
    det = _build('mmdet', _mask_rcnn_cfg(ckpt, det_refs))
    try:
        det.init_weights()
    finally:
        logger.removeHandler(handler)
    src = {k[len('backbone.'):]: v for k, v in clf.state_dict().items()
           if k.startswith('backbone.')}
    dst = det.backbone.state_dict()
    for k, v in src.items():
        if k.endswith('attn.refs') and det_refs != 12:
            # resampled to the detector's reference grid, unit norm
            assert dst[k].shape == (v.shape[0], det_refs, v.shape[2])
            assert torch.allclose(dst[k].norm(dim=-1),
                                  torch.ones(dst[k].shape[:2]), atol=1e-5)
        else:
            assert torch.equal(dst[k], v), k
    # norms the classifier does not have are reported as missing
    report = [r for r in records if 'missing keys' in r]
    assert len(report) == 1 and 'norm0.weight' in report[0]


def test_references_resampled_on_their_grid():
    from mmsetformer.models.set_attention import resample_refs

    # references varying smoothly over a 4 x 5 grid stay ordered on 6 x 8
    g = torch.stack(torch.meshgrid(torch.linspace(0, 1, 4),
                                   torch.linspace(0, 1, 5), indexing='ij'),
                    -1).view(1, 20, 2)
    refs = torch.cat([g, torch.ones(1, 20, 1)], -1)
    out = resample_refs(refs, (6, 8)).view(6, 8, 3)
    ratio = out[..., 0] / out[..., 2]
    assert (ratio[1:] >= ratio[:-1] - 1e-6).all()


def test_flops_count_the_set_operator():
    from mmsetformer.analysis import complexity
    x = torch.randn(1, 3, 64, 64)
    counts = {}
    for T in (1, 5):
        model = SeTformer(**SMALL_KW, num_iters=T)
        counts[T] = complexity(model, (x, ))
    # tokens per stage at stride 4..32 of 64 x 64, times heads and depth
    bhnm = sum(n * h * dep * 12 for n, h, dep in zip(
        [256, 64, 16, 4], SMALL['num_heads'], SMALL['depths']))
    # every extra Sinkhorn iteration is two matrix-vector products with K
    assert counts[5]['flops'] - counts[1]['flops'] == 8 * bhnm
    assert counts[5]['flops_all'] > counts[5]['flops']
    assert counts[1]['params'] == counts[5]['params']


def test_timm_loads_a_classifier_checkpoint_of_this_project(tmp_path):
    import timm
    torch.manual_seed(0)
    clf = _build('mmpretrain', ConfigDict(
        type='ImageClassifier',
        backbone=dict(type='SeTformer', arch='m', num_refs=16,
                      out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=448,
                  loss=dict(type='CrossEntropyLoss'))))
    path = str(tmp_path / 'setformer_m_clf.pth')
    torch.save({'state_dict': clf.state_dict(), 'meta': {}}, path)
    # the overlay describes the file: its head has 5 classes (timm drops a
    # head whose class count differs from the weights')
    model = timm.create_model(
        'setformer_m', pretrained=True, num_classes=5, num_refs=16,
        pretrained_cfg_overlay=dict(file=path, num_classes=5))
    mine = model.state_dict()
    for k, v in clf.state_dict().items():
        assert torch.equal(mine[k], v), k
    clf.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = clf(x, mode='tensor')
        assert torch.allclose(model.eval()(x), ref, atol=1e-5)
