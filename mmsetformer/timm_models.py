"""timm models ``setformer_{m,t,s,b}`` around the one SeTformer backbone.

Keys match mmpretrain's ``ImageClassifier`` (``backbone.*``, ``head.fc.*``),
so a classifier trained with this project's configs loads into timm with
``pretrained_cfg_overlay=dict(file=...)``; ``features_only=True`` returns the
four stage maps (strides 4-32).
"""
from typing import List, Optional, Tuple, Union

import torch
from timm.models import (build_model_with_cfg, generate_default_cfgs,
                         register_model)
from timm.models._features import feature_take_indices
from torch import nn

from .checkpoint import checkpoint_filter_fn
from .models import SeTformer

__all__ = ['SeTformerClassifier']


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
    """SeTformer + global average pooling + linear classifier (timm API)."""

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 num_classes: int = 1000,
                 in_chans: int = 3,
                 global_pool: str = 'avg',
                 drop_rate: float = 0.,
                 **backbone_kwargs):
        super().__init__()
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got "
                             f'{global_pool!r}')
        backbone_kwargs.setdefault('out_indices', (0, 1, 2, 3))
        self.backbone = SeTformer(arch, in_channels=in_chans,
                                  **backbone_kwargs)
        dims = self.backbone.embed_dims
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**i, module=f'backbone.stages.{i}')
            for i, c in enumerate(dims)
        ]
        self.head = _Head(self.num_features, num_classes, drop_rate)
        SeTformer._init_module(self.head.fc)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int,
                         global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = _Head(self.num_features, num_classes, self.drop_rate)
        SeTformer._init_module(self.head.fc)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage maps (always LayerNorm'ed, NCHW) at the chosen indices."""
        if output_fmt != 'NCHW':
            raise ValueError('SeTformer features are NCHW')
        take, _ = feature_take_indices(len(self.backbone.stages), indices)
        feats = self.backbone(x)
        by_stage = dict(zip(self.backbone.out_indices, feats))
        intermediates = [by_stage[i] for i in take]
        if intermediates_only:
            return intermediates
        return feats[-1], intermediates

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


def _create(variant: str, arch: str, pretrained: bool, **kwargs):
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
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
