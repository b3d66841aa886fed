"""timm models ``setformer_{m,t,s,b}`` around the one SeTformer backbone.

Keys match mmpretrain's ``ImageClassifier`` (``backbone.*``, ``head.fc.*``),
so a classifier trained with this project's configs loads into timm with
``pretrained_cfg_overlay=dict(file=...)``; ``features_only=True`` returns the
LayerNorm'ed stage maps (strides 4-32), as the detection and segmentation
backbone does.

Conformance with timm's model checks: every parameter of a classifier
receives a gradient (the backbone owns the output norm of the last stage
only, unless ``features_only`` asks for more), ``torch.fx`` symbolic tracing
and fx feature extraction work (the SeT operator, the input checks and the
stem convolutions are fx leaves), ``torch.jit.trace`` works, and
``torch.jit.script`` is refused with a clear error (the SeT operator is a
custom autograd function): in timm's test-suite terms these models belong
in ``EXCLUDE_JIT_FILTERS``.
"""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models import (build_model_with_cfg, generate_default_cfgs,
                         register_model)
from timm.models._features import feature_take_indices
from torch import nn

from .checkpoint import checkpoint_filter_fn
from .models import SeTformer
from .models.set_attention import shared_kernel_workspace
from .models.setformer import _check_images

__all__ = ['SeTformerClassifier']

_GLOBAL_POOLS = ('avg', '')


class _Head(nn.Module):

    def __init__(self, in_features: int, num_classes: int, drop_rate: float):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 \
            else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class SeTformerClassifier(nn.Module):
    """SeTformer + global average pooling + linear classifier (timm API).

    Args:
        arch, in_chans and ``**backbone_kwargs``: the :class:`SeTformer`.
        num_classes (int): classes of the linear head (0: no head).
        global_pool (str): ``'avg'`` or ``''`` (no pooling).
        drop_rate (float): dropout before the head.
        feature_indices (Sequence[int]): stages whose output norms the
            model owns besides the last one (which the head reads): the
            stages a ``features_only`` model returns. A classifier owns no
            other, so every parameter takes part in its forward pass.
    """

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 num_classes: int = 1000,
                 in_chans: int = 3,
                 global_pool: str = 'avg',
                 drop_rate: float = 0.,
                 feature_indices: Sequence[int] = (),
                 **backbone_kwargs):
        super().__init__()
        self._check_pool(global_pool)
        if 'out_indices' in backbone_kwargs:
            raise TypeError('SeTformerClassifier takes feature_indices, not '
                            'out_indices (timm.create_model(..., '
                            'features_only=True, out_indices=...) sets them)')
        # (SeTformer checks, sorts and de-duplicates the indices)
        self.backbone = SeTformer(
            arch, in_channels=in_chans,
            out_indices=(*feature_indices, SeTformer.num_stages - 1),
            **backbone_kwargs)
        dims = self.backbone.embed_dims
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        # the maps come out of the stage norms (NCHW): fx feature
        # extraction and hooks take them there
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**i, module=f'backbone.norm{i}')
            for i, c in enumerate(dims)
        ]
        self.head = _Head(self.num_features, num_classes, drop_rate)
        SeTformer._init_module(self.head.fc)

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be 'avg' or '', got "
                             f'{global_pool!r}')

    # -- timm's model API -------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int,
                         global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = _Head(self.num_features, num_classes, self.drop_rate)
        SeTformer._init_module(self.head.fc)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every SeT block (``with_cp``)."""
        for stage in self.backbone.stages:
            for block in stage.blocks:
                block.with_cp = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's optim)."""
        return dict(
            stem=r'^backbone\.stem',
            blocks=r'^backbone\.stages\.(\d+)' if coarse else [
                (r'^backbone\.stages\.(\d+)\.downsample', (0, )),
                (r'^backbone\.stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^backbone\.norm(\d+)', (99999, )),
            ])

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """SeT references (3-D, so timm's 1-D rule misses them)."""
        return {n for n, _ in self.named_parameters() if n.endswith('.refs')}

    def _stage_map(self, i: int, tokens: torch.Tensor, hw_shape):
        """The LayerNorm'ed NCHW map of stage ``i``: by the stage's output
        norm if the model has one, else by a LayerNorm without affine
        parameters (what a fresh norm computes)."""
        norm = getattr(self.backbone, f'norm{i}', None)
        if norm is not None:
            return norm(tokens, hw_shape)
        x = F.layer_norm(tokens, (self.backbone.embed_dims[i], ))
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw_shape[0],
                                         hw_shape[1]).contiguous()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage maps (NCHW) at ``indices`` (timm's semantics: all if None,
        the last n if an int).

        The maps are always LayerNorm'ed, as the detection and segmentation
        backbone returns them (see :meth:`_stage_map`), so ``norm`` changes
        nothing. Returns the intermediates, or ``(final features,
        intermediates)`` where the final features are the last stage run's
        map (:meth:`forward_features` unless ``stop_early`` cut it short).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'SeTformer features are NCHW, not '
                             f'{output_fmt!r}')
        bb = self.backbone
        take, max_index = feature_take_indices(len(bb.stages), indices)
        stages = bb.stages
        if stop_early or intermediates_only:
            stages = stages[:max_index + 1]
        x = bb.stem(_check_images(x, bb.in_channels))
        intermediates = []
        with shared_kernel_workspace():
            for i, stage in enumerate(stages):
                tokens, hw_shape = stage(x)
                x = tokens.transpose(1, 2).reshape(x.shape[0], -1,
                                                   hw_shape[0], hw_shape[1])
                if i in take:
                    intermediates.append(self._stage_map(i, tokens, hw_shape))
        if intermediates_only:
            return intermediates
        last = len(stages) - 1
        final = intermediates[take.index(last)] if last in take \
            else self._stage_map(last, tokens, hw_shape)
        return final, intermediates

    def prune_intermediate_layers(self,
                                  indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices``, the output norms
        of stages not taken, and (``prune_head``) the head; returns the
        taken indices. The taken stages' norms are kept whatever
        ``prune_norm`` says: they make SeTformer's features."""
        bb = self.backbone
        take, max_index = feature_take_indices(len(bb.stages), indices)
        bb.stages = bb.stages[:max_index + 1]
        for i in bb.out_indices:
            if i not in take:
                delattr(bb, f'norm{i}')
        bb.out_indices = tuple(i for i in bb.out_indices if i in take)
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.9, interpolation='bicubic', mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), first_conv='backbone.stem.0',
        classifier='head.fc', license='apache-2.0', **kwargs)


# No public weights exist yet: pass a file with
# pretrained_cfg_overlay=dict(file='setformer_t_in1k.pth').
default_cfgs = generate_default_cfgs({
    f'setformer_{v}.untrained': _cfg()
    for v in ('m', 't', 's', 'b')
})


def _create(variant: str, variant_arch: str, pretrained: bool, **kwargs):
    # arch=... (a variant name or a dict) replaces the variant's
    arch = kwargs.pop('arch', variant_arch)
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    if kwargs.get('features_only'):
        # the feature stages get their output norms; a classifier has none
        kwargs.setdefault('feature_indices', feature_take_indices(
            SeTformer.num_stages, out_indices)[0])
    return build_model_with_cfg(
        SeTformerClassifier, variant, pretrained, arch=arch,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs)


@register_model
def setformer_m(pretrained: bool = False, **kwargs) -> SeTformerClassifier:
    return _create('setformer_m', 'm', pretrained, **kwargs)


@register_model
def setformer_t(pretrained: bool = False, **kwargs) -> SeTformerClassifier:
    return _create('setformer_t', 't', pretrained, **kwargs)


@register_model
def setformer_s(pretrained: bool = False, **kwargs) -> SeTformerClassifier:
    return _create('setformer_s', 's', pretrained, **kwargs)


@register_model
def setformer_b(pretrained: bool = False, **kwargs) -> SeTformerClassifier:
    return _create('setformer_b', 'b', pretrained, **kwargs)
