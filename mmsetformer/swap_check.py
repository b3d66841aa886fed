"""Check a swapped config for real: build it with the library's MODELS
registry, run one training step (the library's data preprocessor, loss,
backward, one optimizer step) and one prediction on a small synthetic
batch; and sweep that over one representative config of every model family
shipped with mmdet, mmseg and mmpretrain (``tools/swap_sweep.py``).

The synthetic batches use the libraries' own data structures
(``DetDataSample`` with boxes, labels, masks and, where the model reads
them, semantic maps; ``SegDataSample`` with ``gt_sem_seg``; mmpretrain's
``DataSample`` with ``gt_label``; several views for self-supervised
methods).
"""
import importlib
import math
import os.path as osp
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .swap import NoBackboneError, _find_backbone, _to_dict, backbone_cfg

__all__ = [
    'smoke_test', 'families', 'candidates', 'sweep_family', 'FamilyResult',
    'report_markdown', 'harness_overrides'
]


# -- what the model needs in a batch -----------------------------------------
def _walk(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield path + (k, ), v
            yield from _walk(v, path + (k, ))
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d):
            yield from _walk(v, path + (str(i), ))


_SEMANTIC_KEYS = ('semantic_head', 'seg_head', 'semantic_fusion')


def _num_classes(model_cfg: dict, semantic: bool = False) -> int:
    found = []
    for path, v in _walk(model_cfg):
        if path[-1] not in ('num_classes', 'num_things_classes'):
            continue
        if not isinstance(v, int) or v <= 0:
            continue
        if any(k in _SEMANTIC_KEYS for k in path) != semantic:
            continue
        found.append(v)
    return min(found) if found else 1


def harness_overrides(cfg, size) -> List[str]:
    """Make the written config run on a tiny synthetic batch on the CPU.

    These change the recipe around the model, never the swap: batch
    augmentations that resize to the recipe's size, mmseg's fixed padding
    size, AMP (mmengine's AmpOptimWrapper needs a GPU), teachers loaded
    from checkpoint URLs, and RoI samplers capped at 32 RoIs per image
    (the mask heads' convolutions on 512 RoIs take most of a CPU step).
    Returns what was changed.
    """
    done = []
    model = cfg.model
    pre = model.get('data_preprocessor')
    if pre is not None:
        if pre.get('batch_augments'):
            pre.batch_augments = None
            done.append('data_preprocessor.batch_augments off')
        if pre.get('size') is not None:
            pre.size = (size, size)
            done.append(f'data_preprocessor.size = {size}')
    ow = cfg.get('optim_wrapper')
    if ow is not None and 'Amp' in str(ow.get('type', '')):
        ow.type = 'OptimWrapper'
        for k in ('loss_scale', 'dtype'):
            ow.pop(k, None)
        done.append('AMP off')
    capped = 0
    for _, v in _walk(model.get('train_cfg')):
        if isinstance(v, dict) and isinstance(v.get('num'), int) and \
                'Sampler' in str(v.get('type', '')) and v['num'] > 32:
            v['num'] = 32
            capped += 1
    if capped:
        done.append('RoI samplers capped at 32 RoIs')
    if model.get('teacher_ckpt'):
        model.teacher_ckpt = None
        done.append('distillation teacher from scratch (no download)')
    teacher = model.get('teacher_config')
    if isinstance(teacher, str) and teacher.startswith('configs/'):
        # named relative to the library's repository: the installed
        # package ships it under .mim/configs
        scope = cfg.get('default_scope', 'mmdet')
        model.teacher_config = osp.join(configs_root(scope),
                                        teacher[len('configs/'):])
        done.append('teacher_config found in the installed package')
    return done


_MASK_KEYS = ('mask_head', 'loss_mask', 'mask_roi_extractor',
              'mask_feature_head')


def _needs_masks(model_cfg: dict) -> bool:
    """Instance masks only for models that segment: given masks, RTMDet's
    assigner takes them for tensors."""
    for path, v in _walk(model_cfg):
        if path[-1] in _MASK_KEYS or (
                path[-1] == 'type' and isinstance(v, str) and any(
                    k in v for k in ('Mask', 'SOLO', 'CondInst', 'BoxInst'))):
            return True
    return False


def _mmdet_batch(model_cfg: dict, size: int, batch: int, seed: int):
    from mmdet.testing import demo_mm_inputs
    from mmengine.structures import InstanceData, PixelData
    rng = np.random.RandomState(seed)
    nc = _num_classes(model_cfg)
    keys = {p[-1] for p, _ in _walk(model_cfg)}
    # panoptic models (stuff classes): a semantic map of stuff ids; the
    # instance-only configs of MaskFormer-style models set 0 stuff classes
    num_stuff = [v for p, v in _walk(model_cfg)
                 if p[-1] == 'num_stuff_classes']
    panoptic = bool(num_stuff) and num_stuff[0] > 0
    semantic = panoptic or bool(keys & set(_SEMANTIC_KEYS))
    # one size: some recipes resize to a fixed size in the pipeline and
    # stack without padding (YOLACT, RTMDet)
    shapes = [(3, size, size)] * batch
    # external proposals only for detectors without an RPN (Fast R-CNN):
    # given them, two-stage detectors skip their RPN
    proposals = 'roi_head' in model_cfg and 'rpn_head' not in model_cfg
    data = demo_mm_inputs(batch_size=batch, image_shapes=shapes,
                          num_items=[3 + i for i in range(batch)],
                          num_classes=max(nc, 2),
                          with_mask=_needs_masks(model_cfg))
    things = stuff = 0
    if panoptic:
        things = [v for p, v in _walk(model_cfg)
                  if p[-1] == 'num_things_classes'][0]
        stuff = num_stuff[0]
    for sample, (_, h, w) in zip(data['data_samples'], shapes):
        n = len(sample.gt_instances)
        sample.gt_instances.labels = torch.from_numpy(
            rng.randint(0, nc, size=n)).long()
        boxes = sample.gt_instances.bboxes
        if proposals:
            sample.proposals = InstanceData(
                bboxes=torch.cat([boxes, boxes + 2.]).clamp(0, min(h, w) - 1),
                scores=torch.rand(2 * n))
        # consistent metadata (demo_mm_inputs' scale factor 1.1 x 1.2 does
        # not match its ori_shape); identity view transform for the
        # teacher / student of semi-supervised detectors
        sample.set_metainfo(dict(
            scale_factor=(1., 1.), homography_matrix=np.eye(
                3, dtype=np.float32)))
        if semantic:
            if panoptic:
                sem = rng.randint(things, things + stuff, size=(1, h, w))
            else:
                sem = rng.randint(0, _num_classes(model_cfg, True),
                                  size=(1, h, w))
            sample.gt_sem_seg = PixelData(sem_seg=torch.from_numpy(sem))
    return data


def _mmdet_multi_branch(model_cfg: dict, size: int, batch: int,
                        seed: int):
    """Semi-supervised detectors (SoftTeacher) train on three branches."""
    branches = ('sup', 'unsup_teacher', 'unsup_student')
    data = {'inputs': {}, 'data_samples': {}}
    for i, b in enumerate(branches):
        d = _mmdet_batch(model_cfg, size, batch, seed + i)
        data['inputs'][b] = d['inputs']
        data['data_samples'][b] = d['data_samples']
    return data


def _pipeline_hw(cfg) -> Optional[tuple]:
    """(h, w) of the recipe's fixed test resize, if it has one."""
    for _, v in _walk(_to_dict(cfg.get('test_pipeline') or
                               cfg.get('test_dataloader', {}))):
        if isinstance(v, dict) and v.get('type') == 'Resize' and \
                v.get('keep_ratio') is False and v.get('scale'):
            w, h = v['scale']
            return h, w
    return None


def _video_batch(model_cfg: dict, size: int, batch: int, training: bool):
    """Clips of 2 frames (key + reference) for trackers and video instance
    segmentation; one clip at prediction (they track one video)."""
    from mmdet.testing import demo_track_inputs
    batch = batch if training else 1
    return demo_track_inputs(
        batch_size=batch, num_frames=2, key_frames_inds=[0],
        image_shapes=(3, size, size), num_items=[3] * batch,
        num_classes=_num_classes(model_cfg),
        with_mask=_needs_masks(model_cfg))


def _is_video(model) -> bool:
    try:
        from mmdet.models.mot import BaseMOTModel
    except ImportError:
        return False
    return isinstance(model, BaseMOTModel)


def _reid_batch(cfg, batch: int, seed: int):
    """mmdet's ReID model: crops at the recipe's size (its pooling neck has
    a fixed window), two identities for the triplet loss."""
    from mmdet.structures import ReIDDataSample
    g = torch.Generator().manual_seed(seed)
    h, w = _pipeline_hw(cfg) or (256, 128)
    batch = max(batch, 4)
    inputs = [torch.randint(0, 256, (3, h, w), generator=g,
                            dtype=torch.uint8) for _ in range(batch)]
    samples = []
    for i in range(batch):
        sample = ReIDDataSample()
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w)))
        samples.append(sample.set_gt_label(i % 2))
    return dict(inputs=inputs, data_samples=samples)


def _mmseg_batch(model_cfg: dict, size: int, batch: int, seed: int):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    heads = model_cfg.get('decode_head')
    head = heads[-1] if isinstance(heads, list) else heads
    nc = head.get('num_classes', 2) if isinstance(head, dict) else 2
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        sample = SegDataSample()
        sample.set_metainfo(dict(img_shape=(size, size),
                                 ori_shape=(size, size),
                                 pad_shape=(size, size)))
        sem = torch.randint(0, max(nc, 2), (1, size, size), generator=g)
        sem[:, :2] = 255  # some ignored pixels
        sample.gt_sem_seg = PixelData(data=sem)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _num_views(cfg) -> List[int]:
    for path, v in _walk(_to_dict(cfg)):
        if isinstance(v, dict) and v.get('type') == 'MultiView':
            n = v.get('num_views', 2)
            return list(n) if isinstance(n, (list, tuple)) else [n]
    return [2]


def _mmpretrain_batch(cfg, model, size: int, batch: int, seed: int,
                      training: bool):
    from mmpretrain.models import BaseSelfSupervisor
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(seed)

    def imgs(s):
        return torch.randint(0, 256, (batch, 3, s, s), generator=g,
                             dtype=torch.uint8)

    if isinstance(model, BaseSelfSupervisor):
        samples = [DataSample() for _ in range(batch)]
        if not training:
            return dict(inputs=imgs(size), data_samples=samples)
        views = []
        for i, n in enumerate(_num_views(cfg)):
            views += [imgs(size if i == 0 else max(32, size // 2))
                      for _ in range(n)]
        return dict(inputs=views, data_samples=samples)
    nc = _num_classes(_to_dict(cfg.model))
    samples = [
        DataSample().set_gt_label(int(i % nc)) for i in range(batch)
    ]
    return dict(inputs=list(imgs(size)), data_samples=samples)


def synthetic_batch(cfg, model, scope: str, size: int, batch: int,
                    training: bool, seed: int = 0):
    model_cfg = _to_dict(cfg.model)
    if scope == 'mmdet':
        if model_cfg.get('type') == 'BaseReID':
            return _reid_batch(cfg, batch, seed)
        # ByteTrack trains its detector on images, tracks on videos
        if _is_video(model) and not (
                training and type(model).__name__ == 'ByteTrack'):
            return _video_batch(model_cfg, size, batch, training)
        pre = model_cfg.get('data_preprocessor') or {}
        if training and pre.get('type') == 'MultiBranchDataPreprocessor':
            return _mmdet_multi_branch(model_cfg, size, batch, seed)
        return _mmdet_batch(model_cfg, size, batch, seed)
    if scope == 'mmseg':
        return _mmseg_batch(model_cfg, size, batch, seed)
    return _mmpretrain_batch(cfg, model, size, batch, seed, training)


# -- one training step and one prediction ------------------------------------
def _setformer_of(model):
    from .models import SeTformer
    found = [m for m in model.modules() if isinstance(m, SeTformer)]
    if not found:
        raise AssertionError('the built model holds no SeTformer')
    return found[0]


def _is_selfsup(model) -> bool:
    try:
        from mmpretrain.models import BaseSelfSupervisor
    except ImportError:
        return False
    return isinstance(model, BaseSelfSupervisor)


def _quiet_init_weights(model) -> None:
    """``init_weights`` without mmengine's per-parameter INFO report."""
    import logging

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def smoke_test(cfg, size: int = 64, batch: int = 2, seed: int = 0,
               setformer: bool = True) -> Dict:
    """Build ``cfg.model``, then one training step and one prediction.

    Raises on any failure; returns measurements: ``loss``, the backbone's
    gradient coverage, whether the optimizer step moved the backbone,
    ``num_preds`` and the timings. ``setformer=False`` runs a model
    without SeTformer (an upstream config as shipped) with the same
    checks, less those on SeTformer's gradients.
    """
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope, init_default_scope

    from .apis import build_model
    scope = cfg.get('default_scope', 'mmdet')
    if cfg.get('data_preprocessor') and isinstance(cfg.model, dict):
        # as mmengine's Runner does (mmpretrain states it at top level)
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    overrides = harness_overrides(cfg, size)
    from mmengine.logging import MessageHub
    hub = MessageHub.get_current_instance()
    for key in ('epoch', 'iter'):  # as the Runner's train loop sets them
        hub.update_info(key, 0)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build_model(cfg)
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        # as mmengine's Runner does when not distributed
        from mmengine.model import revert_sync_batchnorm
        model = revert_sync_batchnorm(model)
        overrides.append('SyncBN -> BN (not distributed, as the Runner)')
    _quiet_init_weights(model)
    if hasattr(model, 'prepare_prototype') and not torch.is_tensor(
            model.prototype):
        # a retriever's gallery: random vectors instead of a dataset
        model.prototype = torch.randn(8, model.head.in_channels)
        overrides.append('retrieval gallery: 8 random vectors')
    backbone = _setformer_of(model) if setformer else None
    if _is_selfsup(model) and batch < 4:
        batch = 4  # SwAV's Sinkhorn step gives NaN on 2 images
    init_default_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        optim = build_optim_wrapper(model, cfg.optim_wrapper) \
            if cfg.get('optim_wrapper') else None
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.train()
    data = synthetic_batch(cfg, model, scope, size, batch, True, seed)
    data = model.data_preprocessor(data, True)
    try:
        losses = model(**data, mode='loss')
    except NotImplementedError as e:
        if not _is_video(model):
            raise
        # DeepSORT / StrongSORT: trained as a detector and a ReID model,
        # each with its own config; the tracker itself only predicts
        return _predict_only(cfg, model, scope, size, seed, overrides,
                             t_build, str(e))
    loss, _ = model.parse_losses(losses)
    if not torch.isfinite(loss):
        raise AssertionError(f'loss is not finite: {loss.item()}')
    loss.backward()
    named = [(n, p) for n, p in (backbone or model).named_parameters()
             if p.requires_grad]
    with_grad = [n for n, p in named if p.grad is not None]
    for n, p in named:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise AssertionError(f'non-finite gradient in {n}')
    if backbone is not None:
        needed = [f'stages.{s}.' for s in backbone.out_indices] + ['stem.']
        for prefix in needed:
            if not any(n.startswith(prefix) and
                       (p.grad is not None and p.grad.abs().sum() > 0)
                       for n, p in named):
                raise AssertionError(
                    f'no gradient reached backbone.{prefix}*')
    moved = None
    if optim is not None:
        watched = backbone.stem[0].weight if backbone is not None else next(
            p for _, p in named if p.grad is not None and p.grad.any())
        before = watched.detach().clone()
        optim.step()
        optim.zero_grad()
        moved = not torch.equal(before, watched)
    t_train = time.perf_counter() - t0

    res = _predict(cfg, model, scope, size, batch, seed)
    res.update(loss=loss.item(), grad_params=len(with_grad),
               backbone_params=len(named), optimizer_moved=moved,
               overrides=overrides, build_s=t_build, train_s=t_train)
    return res


def _predict(cfg, model, scope, size, batch, seed) -> Dict:
    # the recipe's test batch (GA-RPN's masked convolution takes one image)
    loader = cfg.get('val_dataloader') or cfg.get('test_dataloader') or {}
    if isinstance(loader.get('batch_size'), int):
        batch = max(1, min(batch, loader['batch_size']))
    t0 = time.perf_counter()
    model.eval()
    data = synthetic_batch(cfg, model, scope, size, batch, False, seed + 1)
    with torch.no_grad():
        data = model.data_preprocessor(data, False)
        mode = 'tensor' if _is_selfsup(model) else 'predict'
        preds = model(**data, mode=mode)
    if mode == 'predict':
        expected = len(data['data_samples'])
        if len(preds) != expected:
            raise AssertionError(f'{len(preds)} predictions for {expected} '
                                 'inputs')
        for p in preds:
            if _is_video(model):
                p = p.video_data_samples[-1]
            if not any(k.startswith('pred_') for k in p.keys()):
                raise AssertionError(f'prediction without pred_* fields: '
                                     f'{sorted(p.keys())}')
    else:
        outs = preds if isinstance(preds, (list, tuple)) else [preds]
        if not all(torch.isfinite(o).all() for o in outs
                   if torch.is_tensor(o)):
            raise AssertionError('non-finite features')
    return dict(predict_mode=mode, num_preds=len(preds),
                predict_s=time.perf_counter() - t0)


def _predict_only(cfg, model, scope, size, seed, overrides, t_build,
                  why) -> Dict:
    res = _predict(cfg, model, scope, size, 1, seed)
    res.update(loss=None, grad_params=0, backbone_params=0,
               optimizer_moved=None, overrides=overrides, build_s=t_build,
               train_s=0., train_skipped=why.strip().splitlines()[0])
    return res


# -- the family sweep ------------------------------------------------------
def configs_root(scope: str) -> str:
    mod = importlib.import_module(scope)
    return osp.join(osp.dirname(mod.__file__), '.mim', 'configs')


def families(scope: str) -> List[str]:
    import os
    root = configs_root(scope)
    return sorted(d for d in os.listdir(root)
                  if osp.isdir(osp.join(root, d)) and not d.startswith('_'))


_BASELINE = re.compile(r'(^|[_\-])(r50|resnet50|resnet-50|r-50)([_\-]|$)')
_SPECIAL = ('caffe', 'c4', 'dc5', 'amp', 'tta', 'fp16', 'lsj', 'mstrain',
            'ms-', 'gn', 'dcn', 'lvis', 'crowd', 'wider', 'v3det',
            'cityscapes', 'voc', 'objects365', 'openimages', 'test', 'bench',
            'd2_')


_MAIN_DATASETS = ('_coco', 'ade20k', 'in1k')


def candidates(scope: str, family: str) -> List[str]:
    """The family's configs, most representative first: the ResNet-50
    baseline, plain recipes, COCO / ADE20K / ImageNet-1K, short names."""
    import glob
    root = configs_root(scope)
    files = sorted(glob.glob(osp.join(root, family, '**', '*.py'),
                             recursive=True))
    rels = [osp.relpath(f, root) for f in files]

    def score(rel):
        name = osp.basename(rel)
        return (rel.count('/') > 1, _BASELINE.search(name) is None,
                sum(s in name for s in _SPECIAL),
                not any(s in name for s in _MAIN_DATASETS), len(name), name)

    return sorted(rels, key=score)


@dataclass
class FamilyResult:
    scope: str
    family: str
    # 'works' | 'fails' (the swap's fault: the upstream config as shipped
    # passes the same check) | 'excluded' (by design) | 'not run' (the
    # upstream config does not run here either: optional package, op
    # without a CPU kernel, upstream bug)
    status: str
    config: Optional[str] = None
    backbone: Optional[str] = None
    reason: str = ''
    seconds: float = 0.
    details: Dict = field(default_factory=dict)
    # candidates passed over: (config, kind, why)
    skipped: List[tuple] = field(default_factory=list)


def _probe_candidate(scope: str, rel: str):
    from mmengine.config import Config

    from .swap import probe_backbone
    cfg = Config.fromfile(osp.join(configs_root(scope), rel))
    if 'model' not in cfg:
        raise NoBackboneError('defines no model (shared settings)')
    model = _to_dict(cfg.model)
    if model.get('type') == 'Detectron2Wrapper':
        raise _NotRunHere('a detectron2 model (Detectron2Wrapper): needs '
                          'detectron2, not installed here')
    probe = probe_backbone(backbone_cfg(model),
                           cfg.get('default_scope', scope))
    if model.get('type') == 'ImageClassifier' and not model.get('head'):
        raise _NotRunHere('a headless feature extractor (no head to train)')
    return probe


class _NotRunHere(Exception):
    """A config the sweep cannot run, though the tool may swap it."""


def _first_line(e) -> str:
    text = str(e).strip().splitlines()
    return ' '.join(text[0].split())[:300] if text else type(e).__name__


def _why(e) -> str:
    return f'{type(e).__name__}: {_first_line(e)}'


def _original_config(scope: str, rel: str):
    """The upstream config as shipped, runnable offline: no pretrained
    weights (they would be downloaded)."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(configs_root(scope), rel))
    cfg.setdefault('default_scope', scope)
    model = cfg.model
    path = _find_backbone(_to_dict(model))
    backbone = model
    for k in path:
        backbone = backbone[k]
    backbone.pop('init_cfg', None)
    if backbone.get('pretrained'):
        backbone.pretrained = None
    owner = model.get('detector', model) if path[0] == 'detector' else model
    if owner.get('pretrained'):
        owner.pretrained = None
    for part in (model, owner):
        if isinstance(part.get('init_cfg'), dict) and \
                part.init_cfg.get('type') == 'Pretrained':
            part.init_cfg = None
    return cfg


def _smoke(cfg_fn: Callable, sizes: Sequence[int], **kw):
    """Smoke test at the first size that works (some heads need more
    tokens than a 64 x 64 image has: DINO's 900 queries)."""
    whys = []
    for size in sizes:
        try:
            res = smoke_test(cfg_fn(), size=size, **kw)
            res['size'] = size
            return res, None
        except Exception as e:  # noqa: BLE001
            if _why(e) not in whys:  # each distinct reason once
                whys.append(_why(e))
            tb = traceback.format_exc()
    return None, (' / '.join(whys), tb)


def sweep_family(scope: str, family: str, swap_tool: Callable,
                 workdir: str, sizes: Sequence[int] = (64, 224, 384),
                 arch: Optional[dict] = None, num_refs: int = 16,
                 max_candidates: int = 20,
                 max_runs: int = 2) -> FamilyResult:
    """One family: its representative config -> ``swap_tool``
    (``tools/swap_backbone.py``'s ``main(argv)``) writes the delta -> build
    + one training step + one prediction (:func:`smoke_test`).

    The representative is the first candidate (:func:`candidates` order)
    whose backbone yields a pyramid (or a single map, for classifiers).
    When the swapped config fails, the upstream config as shipped gets the
    same check: if it fails too, the failure is not the swap's and the
    next candidate is tried (at most ``max_runs``).
    """
    import json

    from mmengine.config import Config

    from .swap import ByDesignError
    t0 = time.perf_counter()
    arch = arch or dict(embed_dims=16, depths=1, num_heads=1, mlp_ratio=2.)
    res = FamilyResult(scope, family, 'excluded')
    runs = 0
    for rel in candidates(scope, family)[:max_candidates]:
        try:
            probe = _probe_candidate(scope, rel)
        except ByDesignError as e:
            res.skipped.append((rel, 'design', _first_line(e)))
            continue
        except _NotRunHere as e:
            res.skipped.append((rel, 'upstream', str(e)))
            continue
        except Exception as e:  # noqa: BLE001  (reported, not hidden)
            res.skipped.append((rel, 'error', _why(e)))
            continue
        runs += 1
        res.config, res.backbone = rel, probe.type
        out = osp.join(workdir, f'{scope}_{family}.py')
        try:
            swap_tool([
                f'{scope}::{rel}', '--arch', json.dumps(arch), '--num-refs',
                str(num_refs), '--drop-path-rate', '0', '--checkpoint',
                'none', '--out', out
            ])
        except ByDesignError as e:
            res.skipped.append((rel, 'design', _first_line(e)))
            res.config = res.backbone = None
            runs -= 1
            continue
        except Exception as e:  # noqa: BLE001
            res.status, res.reason = 'fails', _why(e)
            res.details = dict(traceback=traceback.format_exc()[-3000:])
            break
        details, err = _smoke(lambda: Config.fromfile(out), sizes)
        if err is None:
            res.status, res.details, res.reason = 'works', details, ''
            break
        orig, orig_err = _smoke(lambda: _original_config(scope, rel),
                                sizes, setformer=False)
        if orig_err is None:
            res.status, res.reason = 'fails', err[0]
            res.details = dict(traceback=err[1][-3000:], original=orig)
            break
        res.skipped.append((rel, 'upstream', orig_err[0]))
        res.status, res.reason = 'not run', (
            'the upstream config fails here too: ' + orig_err[0])
        res.details = dict(traceback=err[1][-3000:])
        res.config = res.backbone = None
        if runs >= max_runs:
            break
    if res.status == 'excluded':
        design = [s for s in res.skipped if s[1] == 'design']
        if design:  # what could be examined has no pyramid backbone
            res.reason = _summary(design)
        elif all(s[1] == 'upstream' for s in res.skipped):
            res.status, res.reason = 'not run', _summary(res.skipped)
        else:
            res.status = 'not run'
            res.reason = 'no candidate config could be examined: ' + \
                _summary(res.skipped)
    elif res.status == 'not run':
        res.reason = _summary([s for s in res.skipped
                               if s[1] == 'upstream'])
    res.seconds = time.perf_counter() - t0
    return res


def _summary(skipped: Sequence[tuple]) -> str:
    if not skipped:
        return 'no config'
    reasons = []
    for _, _, r in skipped:
        if r not in reasons:
            reasons.append(r)
    more = f' (+{len(reasons) - 2} other reasons)' if len(reasons) > 2 \
        else ''
    return '; '.join(reasons[:2]) + more


def report_markdown(results: Sequence[FamilyResult], seconds: float,
                    header: str = '') -> str:
    works = [r for r in results if r.status == 'works']
    fails = [r for r in results if r.status == 'fails']
    notrun = [r for r in results if r.status == 'not run']
    excl = [r for r in results if r.status == 'excluded']
    counted = len(works) + len(fails)
    lines = [
        '# Backbone swap sweep', '', header, '',
        f'**{len(works)} of {counted} families work** '
        f'({100 * len(works) / max(counted, 1):.0f} %), {len(fails)} '
        f'fail. Not counted: {len(excl)} families excluded by design (no '
        'config of theirs has a backbone with a multi-scale pyramid, or a '
        f'single map for a classifier) and {len(notrun)} whose upstream '
        'configs do not run on this machine even unswapped. Sweep time '
        f'{seconds / 60:.1f} min.', ''
    ]
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        rs = [r for r in results if r.scope == scope]
        if not rs:
            continue
        n = {k: sum(r.status == k for r in rs)
             for k in ('works', 'fails', 'not run', 'excluded')}
        lines.append(f'- {scope}: {n["works"]} of '
                     f'{n["works"] + n["fails"]} work; {n["excluded"]} '
                     f'excluded by design, {n["not run"]} not run')
    lines.append('')
    if fails:
        lines += ['## Failures', '', '| library | family | config | reason |',
                  '| --- | --- | --- | --- |']
        lines += [f'| {r.scope} | {r.family} | `{r.config}` | '
                  f'{_md(r.reason)} |' for r in fails]
        lines.append('')
    lines += ['## Families that work', '',
              '| library | family | config | upstream backbone | input | '
              'loss | s |', '| --- | --- | --- | --- | --- | --- | --- |']
    lines += [
        f'| {r.scope} | {r.family} | `{r.config}` | {r.backbone} | '
        f'{r.details.get("size", "")} | {_loss(r.details)} | '
        f'{r.seconds:.0f} |' for r in works
    ]
    if notrun:
        lines += ['', '## Not run here (the upstream config fails unswapped '
                  'too)', '', '| library | family | reason |',
                  '| --- | --- | --- |']
        lines += [f'| {r.scope} | {r.family} | {_md(r.reason)} |'
                  for r in notrun]
    lines += ['', '## Excluded by design', '',
              '| library | family | reason |', '| --- | --- | --- |']
    lines += [f'| {r.scope} | {r.family} | {_md(r.reason)} |' for r in excl]
    return '\n'.join(lines) + '\n'


def _loss(details: Dict) -> str:
    if details.get('loss') is None:
        return 'predict only: ' + _md(details.get('train_skipped', ''))
    return f'{details["loss"]:.3g}'


def _md(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def isfinite(x) -> bool:
    return x is not None and math.isfinite(x)
