"""Backbone swap into upstream configs (issue #18): SeTformer takes what
upstream configs pass to their backbones, tools/swap_backbone.py writes a
readable delta, and the delta builds, trains one step and predicts in the
real libraries. The fast subset covers the most used families; the whole
sweep over every family is marked slow (``pytest -m slow``)."""
import copy
import importlib
import math
import os.path as osp
import re
import subprocess
import sys
import warnings

import pytest
import torch
from mmengine.config import Config
from shrink import ROOT

import mmsetformer  # noqa: F401  (registers)
from mmsetformer.apis import build_model
from mmsetformer.models import SeTformer
from mmsetformer.swap import NotAPyramidError, plan_swap, render_delta
from mmsetformer.swap_check import families, smoke_test, sweep_family

TINY = dict(embed_dims=16, depths=1, num_heads=1, mlp_ratio=2.)
DIMS_T = [56, 112, 224, 448]


def _upstream(scope, rel):
    mod = importlib.import_module(scope)
    return Config.fromfile(
        osp.join(osp.dirname(mod.__file__), '.mim', 'configs', rel))


def _swap_tool():
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    from swap_sweep import load_swap_tool
    return load_swap_tool()


# -- pretrained= as mmdet / mmseg backbones take it ---------------------------
def test_pretrained_path_means_pretrained_init_cfg_with_their_warning():
    with pytest.warns(UserWarning, match='DeprecationWarning: pretrained is '
                      'deprecated, please use "init_cfg" instead'):
        model = SeTformer(arch=TINY, num_refs=16, pretrained='ckpt.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='ckpt.pth')
    with pytest.raises(ValueError, match='cannot be specified at the same'):
        SeTformer(arch=TINY, num_refs=16, pretrained='ckpt.pth',
                  init_cfg=dict(type='Pretrained', checkpoint='other.pth'))
    with pytest.raises(TypeError, match='pretrained must be a str or None'):
        SeTformer(arch=TINY, num_refs=16, pretrained=1)


@pytest.mark.parametrize('url', ['open-mmlab://resnet50_v1c',
                                 'torchvision://resnet50',
                                 'mmcls://mobilenet_v2'])
def test_model_zoo_checkpoints_of_other_backbones_are_ignored(url):
    own = dict(type='Pretrained', checkpoint='setformer.pth',
               prefix='backbone.')
    with pytest.warns(UserWarning, match='SeTformer ignores pretrained'):
        model = SeTformer(arch=TINY, num_refs=16, pretrained=url)
    assert model.init_cfg is None
    with pytest.warns(UserWarning, match='starts from its init_cfg'):
        model = SeTformer(arch=TINY, num_refs=16, pretrained=url,
                          init_cfg=own)
    assert model.init_cfg == own


def test_pretrained_whole_model_checkpoint_loads_its_backbone(tmp_path):
    torch.manual_seed(0)
    src = SeTformer(arch=TINY, num_refs=16)
    path = str(tmp_path / 'clf.pth')
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in src.state_dict().items()}}, path)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match='deprecated'):
        dst = SeTformer(arch=TINY, num_refs=16, pretrained=path)
    assert not torch.equal(dst.stem[0].weight, src.stem[0].weight)
    dst.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_upstream_norm_cfg_spelling_is_accepted():
    model = SeTformer(arch=TINY, num_refs=16,
                      norm_cfg=dict(type='SyncBN', requires_grad=False))
    norm = model.stem[1]
    assert isinstance(norm, torch.nn.SyncBatchNorm)
    assert not any(p.requires_grad for p in norm.parameters())


# -- the README's manual swap on mmseg's own configs -------------------------
@pytest.mark.parametrize('rel,readers', [
    ('upernet/upernet_r50_4xb4-160k_ade20k-512x512.py',
     dict(decode_head=dict(in_channels=DIMS_T),
          auxiliary_head=dict(in_channels=DIMS_T[2]))),
    ('sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py',
     dict(neck=dict(in_channels=DIMS_T))),
])
def test_readme_manual_swap_trains_upstream_mmseg_configs(rel, readers):
    """The README's by-hand blocks, merged into mmseg's own files: the
    model builds, trains a step (loss finite, gradients into every stage,
    the optimizer moves the backbone) and predicts."""
    cfg = _upstream('mmseg', rel)
    assert cfg.model.pretrained == 'open-mmlab://resnet50_v1c'
    backbone = dict(
        _delete_=True, type='SeTformer', arch='t', num_refs=800, eps=0.3,
        sigma=0.8, out_indices=(0, 1, 2, 3), drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', prefix='backbone.',
                      checkpoint='checkpoints/setformer_t_in1k.pth'))
    cfg.merge_from_dict(dict(custom_imports=dict(imports=['mmsetformer']),
                             model=dict(backbone=backbone, **readers)))
    model = build_model(copy.deepcopy(cfg))  # mmseg writes into its cfg
    assert type(model.backbone).__name__ == 'SeTformer'
    assert model.backbone.init_cfg['checkpoint'].endswith('in1k.pth')
    # without the weights file: train from scratch, as the README says
    cfg.model.backbone.init_cfg = None
    with pytest.warns(UserWarning, match='ignores pretrained=.open-mmlab'):
        res = smoke_test(cfg, size=64, batch=2)
    assert math.isfinite(res['loss']) and res['optimizer_moved']
    assert res['predict_mode'] == 'predict' and res['num_preds'] >= 1


# -- the planner on the layouts that differ ---------------------------------
def test_dilated_resnet_heads_get_the_same_stages():
    plan = plan_swap('mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_'
                     'cityscapes-512x1024.py', arch='t')
    assert plan.probe.measured == [4, 8, 8, 8]
    assert plan.probe.strides == [4, 8, 16, 32]
    assert plan.backbone['out_indices'] == (0, 1, 2, 3)
    assert plan.model_delta['decode_head'] == dict(in_channels=448)
    assert plan.model_delta['auxiliary_head'] == dict(in_channels=224)
    assert plan.model_delta['pretrained'] is None
    assert 'dilated' in plan.notes[('backbone', )]


def test_pass_through_neck_and_reversed_channels():
    # JPU hands backbone maps through to the auxiliary head
    plan = plan_swap('mmseg::fastfcn/fastfcn_r50-d32_jpu_psp_4xb2-80k_'
                     'cityscapes-512x1024.py', arch='t')
    assert plan.backbone['out_indices'] == (1, 2, 3)
    assert plan.model_delta['neck'] == dict(in_channels=(112, 224, 448))
    assert plan.model_delta['auxiliary_head'] == dict(in_channels=224)
    assert 'decode_head' not in plan.model_delta  # reads JPU's own map
    # YOLOv3's neck lists the channels deepest first
    plan = plan_swap('mmdet::yolo/yolov3_d53_8xb8-320-273e_coco.py',
                     arch='t')
    assert plan.backbone['out_indices'] == (1, 2, 3)
    assert plan.model_delta['neck'] == dict(in_channels=[448, 224, 112])


def test_classifier_backbone_that_pools_gets_a_pooling_neck():
    plan = plan_swap('mmpretrain::convnext/convnext-tiny_32xb128_in1k.py',
                     arch='t')
    assert plan.probe.pooled and plan.backbone['out_indices'] == (3, )
    assert plan.model_delta['neck'] == dict(type='GlobalAveragePooling')
    assert plan.model_delta['head'] == dict(in_channels=448)
    assert plan.checkpoint is None  # classification trains the backbone


def test_layer_decay_constructor_is_replaced():
    plan = plan_swap('mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-'
                     'ms-crop-3x_coco.py', arch='t')
    assert plan.optim_delta['constructor'] == \
        'DefaultOptimWrapperConstructor'
    assert plan.optim_delta['paramwise_cfg']['_delete_']


def test_backbone_inside_a_detector_or_a_list():
    # trackers hold the detector; its trained weights are cleared too
    plan = plan_swap('mmdet::qdtrack/qdtrack_faster-rcnn_r50_fpn_4e_base.py',
                     arch='t', checkpoint=None)
    assert plan.backbone_path == ('detector', 'backbone')
    det = plan.model_delta['detector']
    assert det['neck'] == dict(in_channels=DIMS_T)
    assert det['init_cfg'] is None
    ns = {}
    exec(render_delta(plan), ns)
    assert ns['model']['detector']['backbone']['type'] == 'SeTformer'
    # retrievers: image_encoder = [backbone, neck], replaced whole
    plan = plan_swap('mmpretrain::arcface/resnet50-arcface_8xb32_inshop.py',
                     arch='t')
    enc = plan.model_delta['image_encoder']
    assert enc[0]['type'] == 'SeTformer' and '_delete_' not in enc[0]
    assert enc[1] == dict(type='GlobalAveragePooling')
    assert plan.model_delta['head'] == dict(in_channels=448)


def test_plain_vit_is_excluded_by_design():
    with pytest.raises(NotAPyramidError, match='plain'):
        plan_swap('mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_'
                  'ade20k-512x512.py', arch='t')


# -- the tool --------------------------------------------------------------
def test_tool_writes_a_short_readable_delta(tmp_path):
    out = str(tmp_path / 'upernet_setformer.py')
    rel = 'upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'
    proc = subprocess.run(
        [sys.executable, 'tools/swap_backbone.py', f'mmseg::{rel}', '--arch',
         't', '--out', out], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = open(out).read()
    assert text.count('\n') < 60, text
    assert f"_base_ = ['mmseg::{rel}']" in text
    assert "custom_imports = dict(imports=['mmsetformer']" in text
    assert "pretrained = 'checkpoints/setformer_t_in1k.pth'" in text
    assert 'ResNet' in text and 'from scratch' in text  # checkpoint advice
    assert all(len(line) <= 79 for line in text.splitlines())
    cfg = Config.fromfile(out)
    up = _upstream('mmseg', rel)
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.num_refs, bb.eps, bb.sigma) == (
        'SeTformer', 't', 800, 0.3, 0.8)
    assert 'depth' not in bb and bb.out_indices == (0, 1, 2, 3)
    assert bb.init_cfg.checkpoint == 'checkpoints/setformer_t_in1k.pth'
    assert cfg.model.pretrained is None
    assert list(cfg.model.decode_head.in_channels) == DIMS_T
    assert cfg.model.auxiliary_head.in_channels == DIMS_T[2]
    assert cfg.model.data_preprocessor == up.model.data_preprocessor
    assert cfg.model.decode_head.channels == up.model.decode_head.channels
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['.refs'] == dict(
        decay_mult=0.)
    assert cfg.optim_wrapper.optimizer == up.optim_wrapper.optimizer


def test_rendered_delta_is_the_plan():
    plan = plan_swap('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
                     arch=TINY, num_refs=16, checkpoint=None)
    ns = {}
    exec(render_delta(plan), ns)
    assert ns['model']['backbone']['arch'] == TINY
    assert ns['model']['neck'] == dict(in_channels=[16, 32, 64, 128])
    assert 'pretrained' not in ns and 'init_cfg' not in \
        ns['model']['backbone']


# -- the sweep: build, one training step, one prediction ------------------
FAST = [('mmdet', 'mask_rcnn'), ('mmdet', 'faster_rcnn'),
        ('mmdet', 'retinanet'), ('mmdet', 'fcos'), ('mmdet', 'cascade_rcnn'),
        ('mmseg', 'upernet'), ('mmseg', 'sem_fpn'),
        ('mmseg', 'deeplabv3plus'), ('mmpretrain', 'resnet')]


@pytest.fixture(scope='module')
def swap_tool():
    return _swap_tool()


def _check_works(res):
    assert res.status == 'works', (res.config, res.reason,
                                   res.details.get('traceback'))
    d = res.details
    if d.get('train_skipped'):  # trackers without a loss (DeepSORT)
        assert d['num_preds'] == 1
        return
    assert torch.isfinite(torch.tensor(d['loss']))
    assert d['optimizer_moved'] is True
    assert d['grad_params'] >= 0.8 * d['backbone_params']
    assert d['num_preds'] >= 1  # the recipe's test batch (often 1)


@pytest.mark.parametrize('scope,family', FAST,
                         ids=[f'{s}-{f}' for s, f in FAST])
def test_swap_fast_subset(scope, family, swap_tool, tmp_path):
    warnings.simplefilter('ignore')
    res = sweep_family(scope, family, swap_tool, str(tmp_path))
    # the representative is the family's ResNet-50 baseline
    assert re.search(r'r50|resnet50', res.config), res.config
    _check_works(res)


def test_smoke_test_fails_on_a_broken_swap(tmp_path, swap_tool):
    """The check is not vacuous: a neck left at ResNet's channels fails."""
    out = str(tmp_path / 'broken.py')
    swap_tool(['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', '--arch',
               str(TINY), '--num-refs', '16', '--checkpoint', 'none',
               '--out', out])
    cfg = Config.fromfile(out)
    cfg.model.neck.in_channels = [256, 512, 1024, 2048]
    with pytest.raises(RuntimeError):
        smoke_test(cfg)


def _all_families():
    out = []
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        try:
            out += [(scope, f) for f in families(scope)]
        except ImportError:
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize('scope,family', _all_families(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_swap_every_family(scope, family, swap_tool, tmp_path):
    """Every family works or is excluded by design (its configs have no
    backbone with a pyramid / single map); results/backbone_swap.md is
    this sweep's report (tools/swap_sweep.py)."""
    warnings.simplefilter('ignore')
    res = sweep_family(scope, family, swap_tool, str(tmp_path))
    if res.status == 'excluded':
        assert res.reason
        pytest.skip(f'excluded by design: {res.reason}')
    _check_works(res)
