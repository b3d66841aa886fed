"""Swap SeTformer into any upstream mmdet / mmseg / mmpretrain config.

:func:`plan_swap` reads an upstream config, measures what its backbone
hands to the rest of the model (channels and stride of every output, on a
small dummy image) and works out the delta: a SeTformer with outputs at the
same strides, the channels of whatever reads the backbone (the neck, or the
heads when there is no neck, in every spelling those take), the model-level
``pretrained`` cleared, no weight decay on the SeT references.
:func:`render_delta` writes that as a short config whose ``_base_`` is the
upstream config; ``tools/swap_backbone.py`` is the command line.

Models that cannot take a pyramid backbone by design raise
:class:`ByDesignError`: upstream backbones whose outputs are not a pyramid
SeTformer can give (plain ViTs: one stride; Hourglass: repeated strides;
TridentNet: branches in the batch; :class:`NotAPyramidError`), models with
no backbone part (:class:`NoBackboneError`), heads that hold a stage of the
upstream ResNet (C4 detectors). Anything else that cannot be swapped raises
:class:`SwapError`.
"""
import copy
import importlib
import keyword
import math
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    'SwapError', 'ByDesignError', 'NotAPyramidError', 'NoBackboneError',
    'BackboneProbe', 'SwapPlan',
    'resolve_config', 'load_config', 'backbone_cfg', 'probe_backbone',
    'plan_swap',
    'render_delta', 'write_swapped_config', 'RECIPES', 'SCOPES'
]

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
# SeT settings of the paper's recipe per task (SPEC section 4).
RECIPES = {
    'mmdet': dict(num_refs=750, eps=0.3, sigma=0.8),
    'mmseg': dict(num_refs=800, eps=0.3, sigma=0.8),
    'mmpretrain': dict(num_refs=500, eps=0.1, sigma=0.5),
}
# Stochastic depth of this project's recipes (configs/), per task and size.
DROP_PATH = {
    'mmdet': dict(m=0.1, t=0.2, s=0.3, b=0.3),
    'mmseg': dict(m=0.2, t=0.3, s=0.3, b=0.3),
    'mmpretrain': dict(m=0.1, t=0.2, s=0.3, b=0.5),
}
_ARCH_NAMES = dict(m='m', miny='m', t='t', tiny='t', s='s', small='s',
                   b='b', base='b')
# Optimizer constructors that assign learning rates by the parameter names
# of one backbone family (ConvNeXt / BEiT layer decay): they cannot parse
# SeTformer's names.
_NAME_BASED_CONSTRUCTORS = ('LearningRateDecayOptimizerConstructor',
                            'LayerDecayOptimizerConstructor',
                            'LearningRateDecayOptimWrapperConstructor')
# Backbones whose outputs are not a pyramid by construction, skipped
# without building them (some are large): type -> what they are.
_VIT = 'a plain (single-stride) vision transformer'
_NOT_PYRAMIDS = {
    **dict.fromkeys([
        'VisionTransformer', 'BEiT', 'BEiTViT', 'BEiTPretrainViT', 'MAEViT',
        'MAE', 'CAEPretrainViT', 'MaskFeatViT', 'MILANViT', 'ViTEVA02',
        'DistilledVisionTransformer', 'DeiT3', 'RevVisionTransformer',
        'ViTSAM', 'T2T_ViT', 'TNT', 'XCiT', 'CrossMultimodalViT',
        'VitAdapter', 'SAN'
    ], _VIT),
    'MlpMixer': 'an MLP-Mixer (single-stride tokens)',
    **dict.fromkeys(['SparseResNet', 'SparseConvNeXt'],
                    'a sparse-convolution backbone of masked pretraining '
                    '(SparK)'),
    'Conformer': 'a dual CNN / transformer network whose head reads both '
    'branches',
}


class SwapError(ValueError):
    """The config's model cannot take SeTformer by a backbone swap."""


class ByDesignError(SwapError):
    """The model cannot take a pyramid backbone, by design."""


class NotAPyramidError(ByDesignError):
    """The upstream backbone's outputs are not a pyramid of strides 4-32
    (nor a single map for a classifier): its necks and heads are built for
    that backbone's layout, by design."""


class NoBackboneError(ByDesignError):
    """The model has no backbone part to swap (e.g. multimodal models whose
    image encoder is a ViT inside a larger module), by design."""


@dataclass
class BackboneProbe:
    """What the upstream backbone hands on, measured on a dummy image."""
    type: str
    channels: List[int]
    strides: List[Optional[int]]  # nominal (dilation undone); None: pooled
    measured: List[Optional[int]]  # as computed (dilated backbones: less)
    stages: List[int] = field(default_factory=list)
    pooled: bool = False


@dataclass
class SwapPlan:
    upstream: str  # how the delta's _base_ names the upstream config
    scope: str
    arch: Union[str, dict]
    dims: List[int]
    probe: BackboneProbe
    backbone_path: Tuple[str, ...]
    backbone: dict  # SeTformer kwargs
    model_delta: dict  # what changes besides the backbone, nested
    optim_delta: Optional[dict]
    checkpoint: Optional[str]
    notes: Dict[Tuple[str, ...], str]  # key path -> comment above it
    header: List[str]
    # the upstream config names no default_scope (it relies on the
    # library's own tools to set it): the delta states it
    write_scope: bool = False

    @property
    def out_channels(self) -> List[int]:
        return [self.dims[s] for s in self.probe.stages]


# -- upstream configs -------------------------------------------------------
def _mim_configs(scope: str) -> str:
    mod = importlib.import_module(scope)
    return osp.join(osp.dirname(mod.__file__), '.mim', 'configs')


def resolve_config(name: str) -> Tuple[str, str, Optional[str]]:
    """``(path, base_ref, scope)`` of an upstream config.

    ``name`` is ``'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'`` or a
    path; a path inside a library's shipped configs is named the
    ``scope::`` way in ``base_ref`` so the delta does not depend on where
    the library is installed.
    """
    if '::' in name:
        scope, rel = name.split('::', 1)
        if scope not in SCOPES:
            raise ValueError(f'unknown config scope {scope!r} in {name!r}; '
                             f'one of {SCOPES}')
        path = osp.join(_mim_configs(scope), rel)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{name}: no such config in the '
                                    f'installed {scope} ({path})')
        return path, name, scope
    path = osp.abspath(name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'config not found: {name}')
    for scope in SCOPES:
        try:
            root = _mim_configs(scope)
        except ImportError:
            continue
        if path.startswith(osp.realpath(root) + os.sep) or path.startswith(
                root + os.sep):
            rel = osp.relpath(path, root)
            return path, f'{scope}::{rel}', scope
    return path, path, None


def load_config(name: str):
    from mmengine.config import Config
    path, _, _ = resolve_config(name)
    return Config.fromfile(path)


def _scope_of(cfg, scope_hint: Optional[str]) -> str:
    scope = cfg.get('default_scope') or scope_hint
    if scope not in SCOPES:
        raise SwapError(f'default_scope {scope!r} is not one of {SCOPES}')
    return scope


def _to_dict(x):
    """ConfigDicts and tuples as plain dicts and lists (recursively)."""
    if isinstance(x, dict):
        return {k: _to_dict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_dict(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_to_dict(v) for v in x)
    return x


def _find_backbone(model: dict) -> tuple:
    """Key path of the backbone config in the model config:
    ``('backbone', )``, ``('detector', 'backbone')`` (trackers,
    semi-supervised detectors) or ``('image_encoder', 0)`` (mmpretrain's
    retrievers, whose encoder is a list [backbone, neck])."""
    if isinstance(model.get('backbone'), dict):
        return ('backbone', )
    enc = model.get('image_encoder')
    if isinstance(enc, list) and enc and isinstance(enc[0], dict):
        return ('image_encoder', 0)
    for key in ('detector', 'segmentor', 'classifier'):
        sub = model.get(key)
        if isinstance(sub, dict) and isinstance(sub.get('backbone'), dict):
            return (key, 'backbone')
    keys = sorted(k for k, v in model.items() if isinstance(v, dict))
    raise NoBackboneError(
        f'model {model.get("type")!r} has no `backbone` (its parts: '
        f'{", ".join(keys) or "none"})')


def _get(d: dict, path: Sequence):
    for k in path:
        d = d[k]
    return d


def backbone_cfg(model: dict) -> dict:
    """The backbone config of a model config (see :func:`_find_backbone`).
    """
    return _get(model, _find_backbone(model))


# -- measuring the upstream backbone -----------------------------------------
def _registry(scope: str):
    return importlib.import_module(f'{scope}.registry').MODELS


def _flatten_outputs(out) -> list:
    if hasattr(out, 'shape'):
        return [out]
    flat = []
    for o in out:
        flat += _flatten_outputs(o) if isinstance(o, (list, tuple)) else [o]
    return flat


def _offline_backbone_cfg(cfg: dict) -> dict:
    """A copy that builds without downloading anything."""
    cfg = copy.deepcopy(cfg)
    cfg.pop('init_cfg', None)
    if 'pretrained' in cfg:
        cfg['pretrained'] = False if isinstance(cfg['pretrained'],
                                                bool) else None
    if isinstance(cfg.get('model_name'), str):  # timm-style wrappers
        cfg.setdefault('pretrained', False)
    return cfg


_PROBES: Dict[str, BackboneProbe] = {}


def probe_backbone(backbone_cfg: dict, scope: str,
                   size: int = 64) -> BackboneProbe:
    """Build the upstream backbone (no weights are loaded) and measure
    channels and strides of its outputs on a ``size`` x ``size`` image
    (larger where it needs more). Results are kept per config."""
    key = repr((scope, size, _to_dict(backbone_cfg)))
    if key not in _PROBES:
        _PROBES[key] = _probe_backbone(backbone_cfg, scope, size)
    return copy.deepcopy(_PROBES[key])


def _probe_backbone(backbone_cfg: dict, scope: str,
                    size: int) -> BackboneProbe:
    import torch
    from mmengine.registry import DefaultScope, init_default_scope

    import mmsetformer  # noqa: F401  (registers SeTformer)
    cfg = _offline_backbone_cfg(_to_dict(backbone_cfg))
    kind = str(cfg.get('type'))
    short = kind.split('.')[-1]
    if isinstance(cfg.get('num_classes'), int) and cfg['num_classes'] > 0:
        raise ByDesignError(
            f'{kind} is the whole classifier (num_classes='
            f'{cfg["num_classes"]}): it returns class scores and the '
            'config\'s head only computes the loss')
    if short in _NOT_PYRAMIDS:
        raise NotAPyramidError(
            f'{kind} is {_NOT_PYRAMIDS[short]}; the necks and heads of this '
            'config are built for its layout')
    init_default_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        try:
            net = _registry(scope).build(cfg)
        except Exception as e:  # report what the library said
            raise SwapError(f'cannot build the upstream backbone {kind}: '
                            f'{type(e).__name__}: {e}') from e
    import inspect
    params = inspect.signature(net.forward).parameters
    if 'mask' in params and params['mask'].default is inspect.Parameter.empty:
        raise NotAPyramidError(
            f'{kind} is a masked-image-modelling backbone (its forward takes '
            'the mask); the pretraining algorithm is built for it')
    net.eval()
    outs, err = None, None
    for s in (size, 224, 256, 384):  # windowed ones need a larger input
        try:
            with torch.no_grad():
                outs = _flatten_outputs(net(torch.rand(1, 3, s, s)))
            size = s
            break
        except Exception as e:  # some need a larger input
            err = e
    if outs is None:
        raise SwapError(f'cannot run the upstream backbone {kind}: '
                        f'{type(err).__name__}: {err}')
    # the same in training: some backbones add branches their heads read
    # only there (DDRNet, PIDNet)
    net.train()
    try:
        with torch.no_grad():
            train_outs = _flatten_outputs(net(torch.rand(2, 3, size, size)))
    except Exception:  # noqa: BLE001  (e.g. BN on 1 x 1 maps)
        train_outs = None
    if train_outs is not None and [tuple(o.shape[1:]) for o in train_outs
                                   ] != [tuple(o.shape[1:]) for o in outs]:
        raise NotAPyramidError(
            f'{kind} returns {len(train_outs)} maps in training and '
            f'{len(outs)} at test time (extra training branches its heads '
            'read); its heads are built for that')
    channels, measured = [], []
    for o in outs:
        if o.shape[0] != 1:
            raise NotAPyramidError(
                f'{kind} returns maps with {o.shape[0]} x the batch (branches'
                ' stacked in the batch, as TridentNet does); its heads are '
                'built for that')
        if o.dim() == 4:
            measured.append(size // o.shape[-2] if size % o.shape[-2] == 0
                            else size / o.shape[-2])
            channels.append(int(o.shape[1]))
        elif o.dim() == 2:
            measured.append(None)
            channels.append(int(o.shape[1]))
        else:
            raise NotAPyramidError(
                f'{kind} returns {o.dim()}-D outputs (tokens, not NCHW '
                'maps); its necks and heads are built for that')
    probe = BackboneProbe(kind, channels, list(measured), list(measured))
    # Dilated backbones (mmseg's ResNetV1c d8, MobileNetV2) keep stride 8 in
    # their last stages: undo the dilation to know which stage each
    # output is.
    factors = _undilate_factors(net, cfg, len(outs))
    if factors:
        probe.strides = [
            s * f if s is not None else s for s, f in zip(measured, factors)
        ]
    vit = any(hasattr(net, a) for a in ('cls_token', 'pos_embed'))
    _assign_stages(probe, vit, hasattr(net, 'cls_token'),
                   classifier=scope == 'mmpretrain')
    return probe


def _undilate_factors(net, cfg: dict, n: int) -> Optional[List[int]]:
    """Per output, how much stride a dilated backbone gave up: its
    ``strides`` against the class's default ``strides`` (mmseg's ResNetV1c
    d8 sets (1, 2, 1, 1) for the default (1, 2, 2, 2))."""
    import inspect
    strides, idx = cfg.get('strides'), cfg.get('out_indices')
    if not isinstance(strides, (list, tuple)) or not isinstance(
            idx, (list, tuple)) or len(idx) != n:
        return None
    default = None
    for cls in type(net).__mro__:  # ResNetV1c(**kwargs) -> ResNet
        try:
            param = inspect.signature(cls.__init__).parameters.get('strides')
        except (ValueError, TypeError):
            continue
        if param is not None:
            default = param.default
            break
    if not isinstance(default, (list, tuple)) or len(default) < len(
            strides):
        return None
    factors = []
    for i in idx:
        i = i + len(strides) if i < 0 else i
        f = 1.
        for j in range(min(i + 1, len(strides))):
            f *= default[j] / strides[j]
        factors.append(f)
    return factors


def _assign_stages(probe: BackboneProbe, vit: bool, cls_token: bool,
                   classifier: bool = False) -> None:
    """SeTformer stage of every upstream output.

    Detection and segmentation need the same strides (4, 8, 16, 32,
    growing); classification and self-supervised heads pool a single map
    (or vector), whatever its stride: SeTformer's last stage gives it.
    """
    strides = probe.strides
    if any(s is None for s in strides):
        if len(strides) > 1 or cls_token:
            raise NotAPyramidError(
                f'{probe.type} returns a pooled vector'
                + (' (a class token: plain ViT)' if cls_token else
                   ' among several outputs') +
                '; its heads are built for that')
        probe.pooled = True
        probe.stages = [3]
        return
    if classifier and len(strides) == 1 and not cls_token:
        probe.stages = [3]
        return
    if vit and len(set(strides)) == 1:
        raise NotAPyramidError(
            f'{probe.type} is a plain ViT (all outputs at stride '
            f'{strides[0]}); its necks and heads are built for one stride')
    stages = []
    for s in strides:
        stage = math.log2(s) - 2 if s >= 1 else -1
        if stage != int(stage) or not 0 <= stage <= 3:
            raise NotAPyramidError(
                f'{probe.type} returns a map at stride {s:g} (strides '
                f'{_fmt_strides(strides)}); SeTformer gives strides 4, 8, '
                '16 and 32')
        stages.append(int(stage))
    if any(b <= a for a, b in zip(stages, stages[1:])):
        raise NotAPyramidError(
            f'{probe.type} returns maps at strides '
            f'{_fmt_strides(strides)}, not a pyramid of growing strides; '
            'its necks and heads are built for that layout')
    probe.stages = stages


def _fmt_strides(strides) -> str:
    return ', '.join('pooled' if s is None else f'{s:g}' for s in strides)


# -- the delta ----------------------------------------------------------------
class _Var:
    """A config variable referenced by name in the rendered delta."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, _Var) and other.name == self.name


_IN_KEYS = ('in_channels', 'c1_in_channels')
# Heads that wrap the head reading the backbone.
_WRAPPED_HEADS = {'IterativeDecodeHead': 'kernel_generate_head'}


class _Mapper:
    """Upstream output channels -> SeTformer channels."""

    def __init__(self, probe: BackboneProbe, dims: Sequence[int]):
        self.up = list(probe.channels)
        self.new = [dims[s] for s in probe.stages]

    def by_index(self, i: int) -> int:
        return self.new[i]

    def by_value(self, v: int, where: str) -> int:
        hits = {self.new[i] for i, c in enumerate(self.up) if c == v}
        if len(hits) != 1:
            raise SwapError(
                f'{where}={v} does not name one output of the upstream '
                f'backbone (its channels: {self.up})')
        return hits.pop()

    def channels(self, value, where: str, index=None):
        """New value of an ``in_channels``-like entry."""
        if isinstance(value, (list, tuple)):
            if index is not None:
                idx = list(index) if isinstance(index,
                                                (list, tuple)) else [index]
                if len(idx) != len(value):
                    raise SwapError(f'{where} has {len(value)} entries but '
                                    f'in_index {index} names {len(idx)}')
                new = [self.by_index(i) for i in idx]
            elif list(value) == self.up:
                new = list(self.new)
            else:
                new = [self.by_value(v, where) for v in value]
            return type(value)(new) if isinstance(value, tuple) else new
        if index is not None and not isinstance(index, (list, tuple)):
            return self.by_index(index)
        return self.by_value(value, where)


def _fix_reader(part: dict, mapper: _Mapper, where: str,
                mmseg_head: bool = False) -> dict:
    """Changed keys of a module that reads the backbone's outputs."""
    kind = part.get('type')
    if kind in _WRAPPED_HEADS:
        key = _WRAPPED_HEADS[kind]
        inner = _fix_reader(part[key], mapper, f'{where}.{key}', mmseg_head)
        return {key: inner} if inner else {}
    changes = {}
    # mmseg's BaseDecodeHead reads in_index -1 by default (one map); heads
    # with a list of in_channels and no in_index read every map
    index = part.get('in_index')
    if index is None and mmseg_head and \
            isinstance(part.get('in_channels'), int):
        index = -1
    for key in _IN_KEYS:
        if key not in part or part[key] is None:
            continue
        if key == 'c1_in_channels':  # DeepLabV3+: inputs[0], the finest map
            new = mapper.by_index(0)
        else:
            new = mapper.channels(part[key], f'{where}.{key}', index)
        if new != part[key]:
            changes[key] = new
    return changes


def _apply(part, changes: dict):
    out = copy.deepcopy(part)
    out.update(changes)
    return out


def _head_keys(owner: dict) -> List[str]:
    return [
        k for k, v in owner.items()
        if (k == 'head' or k.endswith('_head')) and isinstance(v, (dict,
                                                                   list))
    ]


def _plan_readers(owner: dict, mapper: _Mapper, scope: str,
                  probe: BackboneProbe, notes: dict,
                  prefix: Tuple[str, ...]) -> dict:
    """Delta of the neck / heads that read the backbone."""
    delta = {}
    neck = owner.get('neck')
    necks = neck if isinstance(neck, list) else [neck] if neck else []
    first = necks[0] if necks else None
    reads_backbone = first is not None and any(k in first for k in _IN_KEYS)
    mmseg = scope == 'mmseg'
    if reads_backbone:
        kind = first.get('type')
        changes = _fix_reader(first, mapper, 'neck')
        if kind == 'SSDNeck':  # hands its inputs through as the first levels
            n = len(first['in_channels'])
            new_in = list(changes.get('in_channels', first['in_channels']))
            out = list(first['out_channels'])
            changes['out_channels'] = type(first['out_channels'])(new_in +
                                                                  out[n:])
            head = owner.get('bbox_head')
            if isinstance(head, dict) and 'in_channels' in head:
                hin = list(head['in_channels'])
                delta['bbox_head'] = dict(in_channels=type(
                    head['in_channels'])(new_in + hin[n:]))
        if isinstance(neck, list):
            delta['neck'] = [_apply(first, changes)] + copy.deepcopy(
                necks[1:])
        elif changes:
            delta['neck'] = changes
        if kind == 'JPU':  # outputs: backbone maps [start, end-1), then its
            start = first.get('start_level', 0)
            end = first.get('end_level', -1)
            end = len(mapper.new) if end == -1 else end
            through = list(range(start, end - 1))
            for key in _head_keys(owner):
                delta.update(
                    _plan_passthrough(owner, key, through, mapper, mmseg))
        return delta
    if neck is not None and first is not None and first.get('type') not in (
            'GlobalAveragePooling', 'GeneralizedMeanPooling', None):
        raise SwapError(f'neck {first.get("type")} has no in_channels: '
                        'cannot tell which backbone maps it reads')
    if probe.pooled and not necks and scope == 'mmpretrain':
        # the upstream backbone pooled its map itself (ConvNeXt)
        delta['neck'] = dict(type='GlobalAveragePooling')
        notes[prefix + ('neck', )] = (
            f'{probe.type} pools its last map itself; SeTformer returns '
            'the map')
    for key in _head_keys(owner):
        head = owner[key]
        if isinstance(head, list):
            new = [
                _apply(h, _fix_reader(h, mapper, f'{key}[{i}]', mmseg))
                for i, h in enumerate(head)
            ]
            if new != head:
                delta[key] = new
            continue
        if key == 'roi_head' and head.get('shared_head'):
            raise ByDesignError(
                'roi_head.shared_head is a stage of the upstream ResNet (a '
                'C4 detector); it cannot be fed by another backbone')
        changes = _fix_reader(head, mapper, key, mmseg)
        if changes:
            delta[key] = changes
    return delta


def _plan_passthrough(owner, key, through, mapper, mmseg) -> dict:
    head = owner[key]
    heads = head if isinstance(head, list) else [head]
    new_heads = []
    for h in heads:
        idx = h.get('in_index', -1)
        if isinstance(idx, int) and 0 <= idx < len(through) and \
                isinstance(h.get('in_channels'), int):
            new_heads.append(
                _apply(h,
                       dict(in_channels=mapper.by_index(through[idx]))))
        else:
            new_heads.append(h)
    if new_heads == heads:
        return {}
    if isinstance(head, list):
        return {key: new_heads}
    return {key: dict(in_channels=new_heads[0]['in_channels'])}


def _nest(path: Sequence[str], value: dict) -> dict:
    for k in reversed(path):
        value = {k: value}
    return value


def _arch_label(arch) -> str:
    if isinstance(arch, str):
        return f'SeTformer-{_ARCH_NAMES.get(arch.lower(), arch).upper()}'
    return 'SeTformer (custom arch)'


def plan_swap(upstream: str,
              arch: Union[str, dict] = 't',
              num_refs: Optional[int] = None,
              eps: Optional[float] = None,
              sigma: Optional[float] = None,
              drop_path_rate: Optional[float] = None,
              checkpoint: Optional[str] = 'auto',
              cfg=None) -> SwapPlan:
    """Work out the delta that puts SeTformer into ``upstream``.

    Args:
        upstream: ``'mmdet::...'`` / ``'mmseg::...'`` / ``'mmpretrain::...'``
            or a config path.
        arch: ``'m'|'t'|'s'|'b'`` or an arch dict (see ``SeTformer``).
        num_refs, eps, sigma: SeT settings; default: the paper's recipe for
            the task (750/0.3/0.8 detection, 800/0.3/0.8 segmentation,
            500/0.1/0.5 classification).
        drop_path_rate: default: this project's recipes for the task/size.
        checkpoint: backbone checkpoint for ``init_cfg``: ``'auto'`` names
            ``checkpoints/setformer_{arch}_in1k.pth`` (the ImageNet
            classifier of ``configs/setformer_{arch}_in1k.py``) for
            detection and segmentation, none for classification (which
            trains it); ``None`` for none.
        cfg: the loaded upstream config, if the caller has it.
    """
    from mmsetformer.models import SeTformer
    path, name, scope_hint = resolve_config(upstream)
    base_ref = name
    if '::' in name and re.match(r'\w*::\w*/\w*', name) is None:
        # mmengine's `pkg::dir/file` form takes \w folder names only
        # ('gn+ws', 'legacy_1.x' are not): name the file by its path
        base_ref = path
    if cfg is None:
        from mmengine.config import Config
        cfg = Config.fromfile(path)
    scope = _scope_of(cfg, scope_hint)
    if 'model' not in cfg:
        raise SwapError(f'{upstream} defines no model')
    model = _to_dict(cfg.model)
    bpath = _find_backbone(model)
    in_list = isinstance(bpath[-1], int)
    # the dict holding the backbone and what reads it
    owner = _get(model, bpath[:-2] if in_list else bpath[:-1])
    old = _get(model, bpath)
    if old.get('type') == 'SeTformer':
        raise SwapError(f'{upstream} already uses SeTformer')
    probe = probe_backbone(old, scope)

    dims = SeTformer._parse_arch(SeTformer, arch)['embed_dims']
    recipe = dict(RECIPES[scope])
    for k, v in dict(num_refs=num_refs, eps=eps, sigma=sigma).items():
        if v is not None:
            recipe[k] = v
    key = _ARCH_NAMES.get(arch.lower()) if isinstance(arch, str) else None
    if drop_path_rate is None:
        drop_path_rate = DROP_PATH[scope][key] if key else 0.1
    if checkpoint == 'auto':
        checkpoint = (f'checkpoints/setformer_{key}_in1k.pth' if key
                      and scope != 'mmpretrain' else None)

    backbone = dict(_delete_=True, type='SeTformer', arch=arch, **recipe,
                    drop_path_rate=drop_path_rate,
                    out_indices=tuple(probe.stages))
    if checkpoint:
        backbone['init_cfg'] = dict(type='Pretrained',
                                    checkpoint=_Var('pretrained'),
                                    prefix='backbone.')
    notes = {}
    label = _arch_label(arch)
    dropped = sorted(k for k in old if k not in ('type', 'out_indices'))
    note_at = bpath[:-1] if in_list else bpath
    notes[note_at] = (
        f'{old.get("type")} -> {label}; dropped with it: '
        + (', '.join(dropped) if dropped else 'nothing'))
    if len(probe.stages) == 1 and probe.strides[0] not in (None, 32):
        notes[note_at] += (
            f'. Its single map (stride {probe.strides[0]:g}) becomes '
            "SeTformer's last one (stride 32), which the head pools")
    if probe.strides != probe.measured:
        notes[note_at] += (
            f'. {old.get("type")} is dilated here (maps at strides '
            f'{_fmt_strides(probe.measured)}); SeTformer gives those stages '
            f'at strides {_fmt_strides(probe.strides)}, which the heads '
            'take too (at a coarser resolution)')
    mapper = _Mapper(probe, dims)
    prefix = bpath[:-2] if in_list else bpath[:-1]
    delta = _plan_readers(owner, mapper, scope, probe, notes, prefix)
    if in_list:  # a list is replaced whole: write all of it
        items = copy.deepcopy(_get(model, bpath[:-1]))
        items[bpath[-1]] = {k: v for k, v in backbone.items()
                            if k != '_delete_'}
        delta = {bpath[-2]: items, **delta}
    readers = [k for k in delta if prefix + (k, ) not in notes]
    if readers:
        notes[prefix + (readers[0], )] = (
            f'what reads the backbone: {old.get("type")} channels '
            f'{probe.channels} -> {label} {mapper.new}')
    pre = owner.get('pretrained')
    if pre:
        delta['pretrained'] = None
        notes[prefix + ('pretrained', )] = (
            f'{pre!r} is a checkpoint of {old.get("type")}, not SeTformer: '
            'mmseg hands it to the backbone, so it is cleared')
    init = owner.get('init_cfg')
    if isinstance(init, dict) and init.get('type') == 'Pretrained':
        # a trained detector / classifier with the upstream backbone
        delta['init_cfg'] = None
        notes[prefix + ('init_cfg', )] = (
            f'{init.get("checkpoint")!r} holds a whole model with '
            f'{old.get("type")}: its neck and heads do not fit SeTformer\'s '
            'channels')
    model_delta = _nest(prefix, delta) if prefix else delta
    minit = model.get('init_cfg')
    if prefix and isinstance(minit, dict) and \
            minit.get('type') == 'Pretrained':
        model_delta['init_cfg'] = None
        notes[('init_cfg', )] = (
            f'{minit.get("checkpoint")!r} holds a whole model with '
            f'{old.get("type")}, not SeTformer')

    optim_delta = None
    ow = _to_dict(cfg.get('optim_wrapper')) or None
    if ow is not None:
        refs = {'.refs': dict(decay_mult=0.)}
        ctor = ow.get('constructor')
        if ctor in _NAME_BASED_CONSTRUCTORS:
            optim_delta = dict(
                constructor='DefaultOptimWrapperConstructor',
                paramwise_cfg=dict(_delete_=True, custom_keys=refs))
            notes[('optim_wrapper', )] = (
                f'{ctor} decays learning rates by {old.get("type")} '
                'parameter names; SeTformer trains with the default '
                'constructor')
        elif ow.get('paramwise_cfg'):
            optim_delta = dict(paramwise_cfg=dict(custom_keys=refs))
        else:
            # with a paramwise_cfg the constructor walks the modules, and
            # sees a module registered twice (SwAV) twice: skip repeats, as
            # the plain parameter list did
            optim_delta = dict(
                paramwise_cfg=dict(custom_keys=refs, bypass_duplicate=True))
            notes[('optim_wrapper', )] = (
                'bypass_duplicate: a module registered twice counts once, '
                'as without a paramwise_cfg')
    header = _header(cfg, name, scope, label, old, probe, dims,
                     checkpoint, arch)
    if base_ref != name:
        header.append(f'(_base_ is a path: mmengine cannot import {name})')
    return SwapPlan(
        upstream=base_ref, scope=scope, arch=arch, dims=list(dims),
        probe=probe, backbone_path=bpath, backbone=backbone,
        model_delta=model_delta, optim_delta=optim_delta,
        checkpoint=checkpoint, notes=notes, header=header,
        write_scope=not cfg.get('default_scope'))


def _header(cfg, base_ref, scope, label, old, probe, dims, checkpoint,
            arch) -> List[str]:
    lines = [
        f'{label} in place of {old.get("type")} in {base_ref}',
        'written by tools/swap_backbone.py: the upstream config stays the',
        '_base_, this file states only what differs.',
    ]
    pre = _to_dict(cfg.model).get('data_preprocessor') or {}
    std = pre.get('std')
    if std is not None and all(float(s) == 1. for s in std):
        lines += [
            'NOTE: this config normalises images caffe-style (std 1); '
            "SeTformer's",
            "ImageNet weights were trained with mmpretrain's RGB mean/std."
        ]
    return lines


# -- rendering ----------------------------------------------------------------
def _is_ident(k) -> bool:
    return isinstance(k, str) and k.isidentifier() and \
        not keyword.iskeyword(k)


def _one_line(v) -> str:
    if isinstance(v, dict):
        if all(_is_ident(k) for k in v):
            return 'dict(' + ', '.join(f'{k}={_one_line(x)}'
                                       for k, x in v.items()) + ')'
        return '{' + ', '.join(f'{k!r}: {_one_line(x)}'
                               for k, x in v.items()) + '}'
    if isinstance(v, list):
        return '[' + ', '.join(_one_line(x) for x in v) + ']'
    if isinstance(v, tuple):
        inner = ', '.join(_one_line(x) for x in v)
        return f'({inner}, )' if len(v) == 1 else f'({inner})'
    if isinstance(v, float):
        return repr(v)
    return repr(v)


def _render(v, col: int, level: int, notes: dict, path: Tuple[str, ...],
            width: int = 79) -> str:
    """``v`` as Python source starting at column ``col`` of a line indented
    by ``level``; what does not fit (or carries comments) is split one item
    per line, indented by 4 more."""
    has_notes = any(p[:len(path)] == path and len(p) > len(path)
                    for p in notes)
    one = _one_line(v)
    if not has_notes and col + len(one) <= width - 1:
        return one
    pad = ' ' * (level + 4)
    if isinstance(v, dict):
        ident = all(_is_ident(k) for k in v)
        lines = []
        for k, x in v.items():
            note = notes.get(path + (k, ))
            if note:
                lines += _comment(note, pad, width)
            head = f'{k}=' if ident else f'{k!r}: '
            lines.append(pad + head + _render(x, len(pad) + len(head),
                                              len(pad), notes, path +
                                              (k, ), width) + ',')
        lines[-1] = lines[-1][:-1]
        opener, closer = ('dict(', ')') if ident else ('{', '}')
        return opener + '\n' + '\n'.join(lines) + closer
    if isinstance(v, (list, tuple)):
        items = [
            pad + _render(x, len(pad), len(pad), notes, path + (str(i), ),
                          width) + ',' for i, x in enumerate(v)
        ]
        if len(v) > 1 or isinstance(v, list):
            items[-1] = items[-1][:-1]
        o, c = ('[', ']') if isinstance(v, list) else ('(', ')')
        return o + '\n' + '\n'.join(items) + c
    return one


def _comment(text: str, pad: str, width: int = 79) -> List[str]:
    words, lines, cur = text.split(), [], ''
    room = width - len(pad) - 2
    for w in words:
        if cur and len(cur) + 1 + len(w) > room:
            lines.append(pad + '# ' + cur)
            cur = w
        else:
            cur = f'{cur} {w}' if cur else w
    if cur:
        lines.append(pad + '# ' + cur)
    return lines


def render_delta(plan: SwapPlan) -> str:
    """The delta config as readable Python source."""
    out = _comment(plan.header[0], '') + ['# ' + line
                                          for line in plan.header[1:]]
    base = f'_base_ = [{plan.upstream!r}]'
    out += [
        base + ('  # noqa: E501' if len(base) > 79 else ''),
        "custom_imports = dict(imports=['mmsetformer'], "
        'allow_failed_imports=False)'
    ]
    if plan.write_scope:
        out.append(f'default_scope = {plan.scope!r}  # the upstream config '
                   'names none')
    out.append('')
    key = _ARCH_NAMES.get(plan.arch.lower()) if isinstance(
        plan.arch, str) else None
    if plan.checkpoint:
        out += _comment(
            f'Backbone weights: the {_arch_label(plan.arch)} ImageNet-1K '
            'classifier (train it with configs/setformer_'
            f'{key or "<arch>"}_in1k.py, or point this at your own '
            'SeTformer checkpoint); its references are resampled to '
            f'num_refs={plan.backbone["num_refs"]} on loading. ResNet / '
            'Swin checkpoints (open-mmlab://, torchvision://, the '
            "upstream's own) do not fit SeTformer. Train from scratch "
            'with --cfg-options model.backbone.init_cfg=None', '')
        out += [f'pretrained = {plan.checkpoint!r}', '']
    else:
        out += _comment(
            'No backbone checkpoint: SeTformer starts from scratch. To '
            'start from a SeTformer checkpoint instead '
            '(configs/setformer_*_in1k.py trains one; ResNet / Swin '
            'checkpoints do not fit SeTformer), add to the backbone:', '')
        out += [
            "#     init_cfg=dict(type='Pretrained', prefix='backbone.',",
            "#                   checkpoint='checkpoints/setformer_"
            f"{key or '<arch>'}_in1k.pth')", ''
        ]
    # the backbone first, then what reads it, as the upstream configs do
    if isinstance(plan.backbone_path[-1], int):  # in model_delta's list
        model = copy.deepcopy(plan.model_delta)
    else:
        model = _merge(_nest(plan.backbone_path, plan.backbone),
                       copy.deepcopy(plan.model_delta))
    body = _render(model, len('model = '), 0, plan.notes, ())
    out.append('model = ' + body)
    if plan.optim_delta is not None:
        note = plan.notes.get(('optim_wrapper', ))
        out += [''] + _comment(
            'No weight decay on the SeT references' +
            (f'. {note}' if note else ''), '')
        out.append('optim_wrapper = ' + _render(
            plan.optim_delta, len('optim_wrapper = '), 0, {}, ()))
    return '\n'.join(out) + '\n'


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def write_swapped_config(upstream: str, out: str, **kwargs) -> SwapPlan:
    """Plan the swap and write the delta config to ``out``."""
    plan = plan_swap(upstream, **kwargs)
    text = render_delta(plan)
    compile(text, out, 'exec')  # never write a config that does not parse
    d = osp.dirname(osp.abspath(out))
    os.makedirs(d, exist_ok=True)
    with open(out, 'w') as f:
        f.write(text)
    return plan
