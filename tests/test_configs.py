"""Every recipe config loads and builds, and states the paper's recipe (the
assertions fail if someone edits a recipe value)."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config
from shrink import ROOT

from mmsetformer.apis import build_model

CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*.py')))
RECIPES = [c for c in CONFIGS if 'demo' not in c]
DET = [c for c in RECIPES if 'rcnn' in osp.basename(c)]
SEG = [c for c in RECIPES if 'upernet' in osp.basename(c)]
CLS = [c for c in CONFIGS if c.endswith('_in1k.py')]
DIMS = dict(m=[56, 112, 224, 448], t=[56, 112, 224, 448],
            s=[64, 128, 256, 512], b=[80, 160, 320, 640])


def _variant(path):
    return osp.basename(path).split('setformer_')[1][0]


def test_expected_configs_exist():
    names = {osp.basename(c) for c in CONFIGS}
    for v in 'mtsb':
        assert f'mask_rcnn_setformer_{v}_3x.py' in names
        assert f'upernet_setformer_{v}_160k.py' in names
        assert f'setformer_{v}_in1k.py' in names
    for v in 'mts':
        assert f'cascade_mask_rcnn_setformer_{v}_3x.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_builds_its_model(path):
    cfg = Config.fromfile(path)
    assert 'mmsetformer' in cfg.custom_imports['imports']
    cfg.model.backbone.pop('init_cfg', None)  # pretrained file not shipped
    model = build_model(cfg)
    backbone = model.backbone
    assert type(backbone).__name__ == 'SeTformer'
    dims = backbone.embed_dims
    if 'demo' not in path:
        v = _variant(path)
        assert dims == DIMS[v]
        assert backbone.arch_settings == type(backbone).arch_zoo[v]
    # the neck/head takes exactly the backbone's channels
    if 'rcnn' in osp.basename(path):
        assert list(cfg.model.neck.in_channels) == dims
    elif 'upernet' in osp.basename(path):
        assert list(cfg.model.decode_head.in_channels) == dims
        assert cfg.model.auxiliary_head.in_channels == dims[2]
    else:
        assert cfg.model.head.in_channels == dims[-1]


def _no_decay_rules(cfg):
    pw = cfg.optim_wrapper.paramwise_cfg
    assert pw.norm_decay_mult == 0 and pw.bias_decay_mult == 0
    assert pw.custom_keys['.refs'].decay_mult == 0


def _set_params_and_adamw(cfg, m, eps, sigma, lr, wd):
    bb = cfg.model.backbone
    assert (bb.num_refs, bb.eps, bb.sigma) == (m, eps, sigma)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', lr, wd)
    _no_decay_rules(cfg)


@pytest.mark.parametrize('path', DET, ids=osp.basename)
def test_coco_3x_recipe(path):
    cfg = Config.fromfile(path)
    _set_params_and_adamw(cfg, 750, 0.3, 0.8, 1e-4, 0.05)
    assert cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.train_cfg.max_epochs == 36
    step = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR'][0]
    assert step.milestones == [27, 33] and step.gamma == 0.1
    # multi-scale 480-800 (long side <= 1333) with Swin's crop branch
    choice = [t for t in cfg.train_pipeline if t.type == 'RandomChoice'][0]
    plain, crop = choice.transforms
    shorts = sorted(s[0] for s in plain[0].scales)
    assert shorts[0] == 480 and shorts[-1] == 800
    assert all(s[1] == 1333 for s in plain[0].scales)
    assert [t.type for t in crop] == ['RandomChoiceResize', 'RandomCrop',
                                      'RandomChoiceResize']
    assert crop[1].crop_size == (384, 600)
    assert cfg.model.backbone.init_cfg.prefix == 'backbone.'
    assert cfg.model.backbone.init_cfg.checkpoint == cfg.pretrained
    assert ('AmpOptimWrapper' if '_amp_' in path else 'OptimWrapper') \
        == cfg.optim_wrapper.type
    if 'cascade' in osp.basename(path):
        heads = cfg.model.roi_head.bbox_head
        assert cfg.model.type == 'CascadeRCNN' and len(heads) == 3
        for h in heads:
            assert (h.num_shared_convs, h.num_shared_fcs) == (4, 1)
            assert h.loss_bbox.type == 'GIoULoss' and h.reg_decoded_bbox
        assert [r.assigner.pos_iou_thr for r in cfg.model.train_cfg.rcnn] \
            == [0.5, 0.6, 0.7]


@pytest.mark.parametrize('path', SEG, ids=osp.basename)
def test_ade20k_160k_recipe(path):
    cfg = Config.fromfile(path)
    _set_params_and_adamw(cfg, 800, 0.3, 0.8, 6e-5, 0.01)
    assert cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.crop_size == (512, 512)
    assert cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.train_cfg.max_iters == 160000
    warm, decay = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end) == ('LinearLR', 0, 1500)
    assert (decay.type, decay.power, decay.begin, decay.end,
            decay.eta_min) == ('PolyLR', 1.0, 1500, 160000, 0.0)
    # multi-scale + flip test time augmentation for --tta
    tta = cfg.tta_pipeline[1]
    assert tta.type == 'TestTimeAug'
    assert len(tta.transforms[0]) >= 3
    assert [f.prob for f in tta.transforms[1]] == [0., 1.]
    assert cfg.tta_model.type == 'SegTTAModel'


@pytest.mark.parametrize('path', CLS, ids=osp.basename)
def test_imagenet_recipe(path):
    cfg = Config.fromfile(path)
    _set_params_and_adamw(cfg, 500, 0.1, 0.5, 1e-3, 0.05)
    assert cfg.train_dataloader.batch_size * 16 == 1024
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=1024)
    assert cfg.train_cfg.max_epochs == 300
    warm, cos = cfg.param_scheduler
    assert (warm.type, warm.end) == ('LinearLR', 20)
    assert (cos.type, cos.begin, cos.end, cos.eta_min) == (
        'CosineAnnealingLR', 20, 290, 1e-5)  # 10 cool-down epochs after
    augments = cfg.model.train_cfg.augments
    assert [a.type for a in augments] == ['Mixup', 'CutMix']
    assert [a.alpha for a in cfg.model.train_cfg.augments] == [0.8, 1.0]
    assert cfg.model.head.loss.label_smooth_val == 0.1
    types = {t.type: t for t in cfg.train_pipeline}
    assert types['RandomErasing'].erase_prob == 0.25
    assert 'RandAugment' in types
    dpr = {'m': 0.1, 't': 0.2, 's': 0.3, 'b': 0.5}[_variant(path)]
    assert cfg.model.backbone.drop_path_rate == dpr


def test_no_weight_decay_on_refs_norms_biases():
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile(osp.join(ROOT, 'configs',
                                   'mask_rcnn_setformer_t_3x.py'))
    cfg.model.backbone.pop('init_cfg')
    model = build_model(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            decay[names[id(p)]] = group['weight_decay']
    assert decay['backbone.stages.0.blocks.0.attn.refs'] == 0
    assert decay['backbone.stages.0.blocks.0.norm1.weight'] == 0
    assert decay['backbone.stages.0.blocks.0.attn.qv.bias'] == 0
    assert decay['backbone.stages.0.blocks.0.attn.qv.weight'] == 0.05


def test_missing_pretrained_file_has_clear_message():
    cfg = Config.fromfile(osp.join(ROOT, 'configs',
                                   'upernet_setformer_t_160k.py'))
    model = build_model(cfg)
    with pytest.raises(FileNotFoundError, match='pretrained'):
        model.init_weights()
