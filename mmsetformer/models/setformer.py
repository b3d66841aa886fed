"""SeTformer: Swin's macro design with SeT attention in place of windows.

One definition serves classification (mmpretrain, timm), detection (mmdet)
and segmentation (mmseg); the libraries only register it.
"""
import warnings
from copy import deepcopy
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .set_attention import (SeTAttention, check_num_refs,
                            shared_kernel_workspace)

__all__ = ['SeTformer', 'LayerNorm2d', 'StageNorm']


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)


class StageNorm(nn.LayerNorm):
    """LayerNorm of a stage's tokens, returned as the stage's NCHW map (a
    module per output, so fx feature extraction can name the maps)."""

    def forward(self, tokens: torch.Tensor, hw_shape) -> torch.Tensor:
        x = super().forward(tokens)
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw_shape[0],
                                         hw_shape[1]).contiguous()


_CONV_NORMS = {
    'LN2d': LayerNorm2d,
    'BN': nn.BatchNorm2d,
    'SyncBN': nn.SyncBatchNorm,
}


def _conv_norm(norm_cfg: dict, channels: int) -> nn.Module:
    cfg = dict(norm_cfg)
    kind = cfg.pop('type')
    if kind not in _CONV_NORMS:
        raise ValueError(f'norm_cfg type must be one of '
                         f'{sorted(_CONV_NORMS)}, got {kind!r}')
    # mmcv's spelling, as upstream configs write it (norm_cfg=dict(
    # type='SyncBN', requires_grad=True))
    requires_grad = cfg.pop('requires_grad', True)
    norm = _CONV_NORMS[kind](channels, **cfg)
    for p in norm.parameters():
        p.requires_grad = requires_grad
    return norm


# Model-zoo schemes of mmengine's checkpoint loader: every checkpoint they
# name belongs to another architecture (ResNet, ResNeXt, HRNet, RegNet,
# MobileNet, ...), never to SeTformer.
ZOO_SCHEMES = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'mmcls://')


def _pretrained_init_cfg(pretrained, init_cfg):
    """``init_cfg`` for the ``pretrained=`` argument of mmdet / mmseg
    backbones (mmseg's ``EncoderDecoder`` passes its model-level
    ``pretrained`` to the backbone; 23 of mmseg's base models set it).

    Same meaning and warning as theirs: a path or URL becomes
    ``dict(type='Pretrained', checkpoint=pretrained)`` and may not be given
    together with ``init_cfg``. One difference: a model-zoo name
    (``open-mmlab://resnet50_v1c``, ``torchvision://resnet50``, ...) is a
    checkpoint of the backbone the upstream config was written for, so it
    is ignored with a warning and ``init_cfg`` (or the initialisation at
    construction) stands.
    """
    if pretrained is None:
        return init_cfg
    if not isinstance(pretrained, str):
        raise TypeError('pretrained must be a str or None, got '
                        f'{type(pretrained).__name__}')
    if pretrained.startswith(ZOO_SCHEMES):
        warnings.warn(
            f'SeTformer ignores pretrained={pretrained!r}: it names a '
            'model-zoo checkpoint of another backbone (the one the upstream '
            'config was written for), which holds no SeTformer weights. '
            'The backbone starts from '
            + ('its init_cfg' if init_cfg else 'scratch') + '. Set the '
            "model-level `pretrained=None` and load a SeTformer checkpoint "
            "with init_cfg=dict(type='Pretrained', checkpoint=..., "
            "prefix='backbone.') (tools/swap_backbone.py writes both).")
        return init_cfg
    if init_cfg:
        raise ValueError('init_cfg and pretrained cannot be specified at '
                         f'the same time (pretrained={pretrained!r}, '
                         f'init_cfg={init_cfg!r})')
    warnings.warn('DeprecationWarning: pretrained is deprecated, '
                  'please use "init_cfg" instead')
    return dict(type='Pretrained', checkpoint=pretrained)


def _conv2d(x: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], stride, padding, dilation,
            groups: int) -> torch.Tensor:
    """``F.conv2d`` that sidesteps a PyTorch CPU bug: in bfloat16, a strided
    conv whose output is one column wide (input width <= stride) returns
    wrong outputs (for taller maps) and garbage weight gradients (1e30 or
    NaN), as measured with torch 2.14's oneDNN kernels. Such maps run in
    fp32; everything else is untouched. (The dtype is tested before the
    width, so exporters with a dynamic width see no guard on it.)"""
    if x.device.type == 'cpu' and (
            x.dtype == torch.bfloat16 or
            (torch.is_autocast_enabled('cpu')
             and torch.get_autocast_dtype('cpu') == torch.bfloat16)) \
            and x.shape[-1] <= stride[1]:
        with torch.autocast('cpu', enabled=False):
            y = F.conv2d(x.float(), weight.float(),
                         None if bias is None else bias.float(), stride,
                         padding, dilation, groups)
        return y.to(weight.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _check_images(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``x`` if it is a float (B, in_channels, H >= 1, W >= 1) batch."""
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            'SeTformer expects a 4-D float image batch (B, C, H, W), got ' +
            (f'{x.dim()}-D {x.dtype}' if torch.is_tensor(x) else
             type(x).__name__))
    if x.shape[1] != in_channels:
        raise ValueError(f'SeTformer expects {in_channels} input '
                         f'channels, got {x.shape[1]}')
    if min(x.shape[-2:]) < 1:
        raise ValueError(f'empty image of size {tuple(x.shape[-2:])}')
    return x


# Leaves of torch.fx tracing: their checks on shapes and dtypes run in the
# traced graph instead of failing on symbolic values.
torch.fx.wrap('_conv2d')
torch.fx.wrap('_check_images')


class _Conv2d(nn.Conv2d):
    """Conv2d through :func:`_conv2d` (the CPU bfloat16 fix)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv2d(x, self.weight, self.bias, self.stride, self.padding,
                       self.dilation, self.groups)


def _conv_down(in_ch: int, out_ch: int, norm_cfg: dict) -> nn.Sequential:
    """conv3x3 stride 2 + norm: H x W -> ceil(H/2) x ceil(W/2)."""
    return nn.Sequential(
        _Conv2d(in_ch, out_ch, 3, stride=2, padding=1),
        _conv_norm(norm_cfg, out_ch))


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0], ) + (1, ) * (x.dim() - 1))
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'


class Mlp(nn.Sequential):

    def __init__(self, dims: int, hidden: int, drop: float = 0.):
        super().__init__(
            nn.Linear(dims, hidden), nn.GELU(), nn.Dropout(drop),
            nn.Linear(hidden, dims), nn.Dropout(drop))


class SeTBlock(nn.Module):
    """Pre-norm block: x + DropPath(SeT(LN(x))), x + DropPath(MLP(LN(x)))."""

    def __init__(self, dims: int, num_heads: int, mlp_ratio: float,
                 drop_path: float, drop_rate: float, with_cp: bool,
                 **set_cfg):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(dims)
        self.attn = SeTAttention(dims, num_heads, proj_drop=drop_rate,
                                 **set_cfg)
        self.norm2 = nn.LayerNorm(dims)
        self.mlp = Mlp(dims, int(dims * mlp_ratio), drop_rate)
        self.drop_path = DropPath(drop_path)

    def _forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        if self.with_cp and not isinstance(x, torch.fx.Proxy) \
                and x.requires_grad:
            return cp.checkpoint(self._forward, x, hw_shape,
                                 use_reentrant=False)
        return self._forward(x, hw_shape)


class SeTStage(nn.Module):
    """Optional conv down-sampler, then SeT blocks on the token map."""

    def __init__(self, in_dims: int, dims: int, depth: int, num_heads: int,
                 drop_paths: Sequence[float], downsample: bool,
                 norm_cfg: dict, **block_cfg):
        super().__init__()
        self.downsample = _conv_down(in_dims, dims, norm_cfg) \
            if downsample else None
        self.blocks = nn.ModuleList(
            SeTBlock(dims, num_heads, drop_path=dp, **block_cfg)
            for dp in drop_paths[:depth])

    def forward(self, x: torch.Tensor):
        """(B, C_in, H, W) -> tokens (B, H'W', C) and (H', W')."""
        if self.downsample is not None:
            x = self.downsample(x)
        hw_shape = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, hw_shape)
        return x, hw_shape


class SeTformer(BaseModule):
    """SeTformer backbone.

    Args:
        arch (str | dict): ``'m'/'t'/'s'/'b'`` (or ``'miny'/'tiny'/'small'/
            'base'``) or a dict with ``embed_dims``, ``depths``,
            ``num_heads`` (per stage) and ``mlp_ratio``.
        num_refs (int): SeT references m per layer (500 ImageNet, 750 COCO,
            800 ADE20K in the paper's recipes).
        eps (float): entropic regularisation epsilon (> 0).
        sigma (float): LPE bandwidth (> 0).
        num_iters (int): Sinkhorn iterations T.
        use_lpe (bool): linear positional encoding on/off.
        ref_grid (tuple, optional): reference grid (g_h, g_w), g_h*g_w = m.
        in_channels (int): input channels.
        out_indices (Sequence[int]): stages whose (LayerNorm'ed) maps are
            returned, strides 4/8/16/32.
        drop_rate (float): dropout after projections and MLPs.
        drop_path_rate (float): stochastic depth, growing linearly with depth.
        norm_cfg (dict): norm of the conv stem and down-samplers: ``LN2d``
            (default), ``BN`` or ``SyncBN``.
        frozen_stages (int): -1 trains all; 0 freezes the stem; k freezes the
            stem and the first k stages (and their output norms).
        norm_eval (bool): keep every norm layer in eval mode while training.
        with_cp (bool): activation checkpointing of every block.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=...,
            prefix='backbone.')`` loads (safely) a classifier, detector or
            segmentor checkpoint; otherwise the weights are initialised at
            construction (trunc-normal linears, unit-norm references).
        pretrained (str, optional): deprecated, as in mmdet / mmseg
            backbones (mmseg's segmentors pass their model-level
            ``pretrained`` here): a checkpoint path or URL, the same as
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``
            (when the file holds a whole model, its ``backbone.`` weights
            are loaded). Model-zoo names of other backbones
            (``open-mmlab://``, ``torchvision://``, ``mmcls://``) are
            ignored with a warning.

    Shapes: ``forward((B, 3, H, W))`` returns NCHW maps of
    ``ceil(H / s) x ceil(W / s)`` for s = 4, 8, 16, 32 (``out_indices``).
    """
    # Widths and MLP ratios are ours (the paper gives depths and sizes
    # only): chosen so that, with m = 500 and a 1000-class head, the
    # parameter counts land within 3 % of the paper's Table 1.
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['m', 'miny'], dict(
            embed_dims=[56, 112, 224, 448], depths=[3, 4, 6, 5],
            num_heads=[2, 4, 8, 16], mlp_ratio=3.)),
        **dict.fromkeys(['t', 'tiny'], dict(
            embed_dims=[56, 112, 224, 448], depths=[3, 4, 18, 5],
            num_heads=[2, 4, 8, 16], mlp_ratio=3.)),
        **dict.fromkeys(['s', 'small'], dict(
            embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 5],
            num_heads=[2, 4, 8, 16], mlp_ratio=4.)),
        **dict.fromkeys(['b', 'base'], dict(
            embed_dims=[80, 160, 320, 640], depths=[3, 4, 18, 5],
            num_heads=[2, 4, 8, 16], mlp_ratio=4.5)),
    }  # yapf: disable
    num_stages = 4

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 num_refs: int = 500,
                 eps: float = 0.1,
                 sigma: float = 0.5,
                 num_iters: int = 3,
                 use_lpe: bool = True,
                 ref_grid: Optional[Sequence[int]] = None,
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 norm_cfg: dict = dict(type='LN2d'),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        init_cfg = _pretrained_init_cfg(pretrained, init_cfg)
        super().__init__(init_cfg=init_cfg)
        self.pretrained = pretrained
        self.arch_settings = arch = self._parse_arch(arch)
        dims, depths = arch['embed_dims'], arch['depths']
        self.embed_dims = list(dims)
        self.in_channels = in_channels
        self.out_indices = self._parse_out_indices(out_indices)
        if isinstance(frozen_stages, bool) or not isinstance(
                frozen_stages, int) or not -1 <= frozen_stages <= 4:
            raise ValueError('frozen_stages must be an int in [-1, 4] '
                             f'(-1: none, 0: stem, k: stem + k stages), got '
                             f'{frozen_stages!r}')
        check_num_refs(num_refs, ref_grid)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.num_refs = num_refs

        self.stem = nn.Sequential(
            _Conv2d(in_channels, dims[0] // 2, 3, stride=2, padding=1),
            _conv_norm(norm_cfg, dims[0] // 2), nn.GELU(),
            *_conv_down(dims[0] // 2, dims[0], norm_cfg))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        set_cfg = dict(num_refs=num_refs, eps=eps, sigma=sigma,
                       num_iters=num_iters, use_lpe=use_lpe,
                       ref_grid=ref_grid)
        for i in range(self.num_stages):
            self.stages.append(
                SeTStage(dims[max(i - 1, 0)], dims[i], depths[i],
                         arch['num_heads'][i], dpr[sum(depths[:i]):],
                         downsample=i > 0, norm_cfg=norm_cfg,
                         mlp_ratio=arch['mlp_ratio'], drop_rate=drop_rate,
                         with_cp=with_cp, **set_cfg))
        for i in self.out_indices:
            self.add_module(f'norm{i}', StageNorm(dims[i]))
        self.apply(self._init_module)
        self._freeze_stages()

    # -- construction -----------------------------------------------------
    def _parse_arch(self, arch) -> dict:
        if isinstance(arch, str):
            key = arch.lower()
            if key not in self.arch_zoo:
                raise ValueError(f'arch {arch!r} is not one of '
                                 f'{sorted(self.arch_zoo)}; pass a dict for '
                                 'a custom architecture')
            return deepcopy(self.arch_zoo[key])
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or dict, got {type(arch)}')
        needed = {'embed_dims', 'depths', 'num_heads'}
        if not needed <= set(arch):
            raise ValueError(f'a custom arch needs keys {sorted(needed)}, '
                             f'got {sorted(arch)}')
        arch = {'mlp_ratio': 4., **deepcopy(arch)}
        for key in ('embed_dims', 'depths', 'num_heads'):
            if isinstance(arch[key], int):
                # embed_dims=C means Swin's C, 2C, 4C, 8C.
                base = arch[key]
                arch[key] = [base * 2**i for i in range(self.num_stages)] \
                    if key != 'depths' else [base] * self.num_stages
            if len(arch[key]) != self.num_stages:
                raise ValueError(f'arch[{key!r}] needs {self.num_stages} '
                                 f'values, got {arch[key]}')
        for i, (c, h) in enumerate(zip(arch['embed_dims'],
                                       arch['num_heads'])):
            if h < 1 or c % h:
                raise ValueError(f'stage {i}: embed_dims {c} is not '
                                 f'divisible by num_heads {h}')
        if arch['embed_dims'][0] % 2:
            raise ValueError('embed_dims[0] must be even (the stem has '
                             f'embed_dims[0] // 2 channels), got '
                             f'{arch["embed_dims"][0]}')
        return arch

    def _parse_out_indices(self, out_indices) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out = []
        for i in out_indices:
            j = i + self.num_stages if i < 0 else i
            if not 0 <= j < self.num_stages:
                raise ValueError(f'out_indices {tuple(out_indices)} must be '
                                 f'in [-{self.num_stages}, '
                                 f'{self.num_stages - 1}]')
            out.append(j)
        return tuple(sorted(set(out)))

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            # Biases keep PyTorch's (non-constant) init: with zero biases a
            # constant region (zero padding) reaches the channel LayerNorms
            # with zero variance, whose backward then scales by 1/sqrt(eps)
            # per norm and blows up the stem's bias gradients.
            nn.init.kaiming_normal_(m.weight, mode='fan_out',
                                    nonlinearity='relu')
        elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from ..checkpoint import load_pretrained
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'),
                            map_location=cfg.get('map_location', 'cpu'))
            self._is_init = True
            return
        # Weights were initialised at construction; other init_cfg apply.
        super().init_weights()

    # -- training behaviour -----------------------------------------------
    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.stem
        for i in range(self.frozen_stages):
            yield self.stages[i]
            if i in self.out_indices:
                yield getattr(self, f'norm{i}')

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                    m.eval()
        return self

    # -- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.stem(_check_images(x, self.in_channels))
        outs = []
        with shared_kernel_workspace():
            for i, stage in enumerate(self.stages):
                tokens, hw_shape = stage(x)
                x = tokens.transpose(1, 2).reshape(x.shape[0], -1,
                                                   hw_shape[0], hw_shape[1])
                if i in self.out_indices:
                    outs.append(getattr(self, f'norm{i}')(tokens, hw_shape))
        return tuple(outs)
