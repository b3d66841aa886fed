"""Config and model helpers shared by the tools (any of the three libraries).
"""
import os
from typing import Optional, Sequence

import torch
from mmengine.config import Config, DictAction  # noqa: F401
from mmengine.registry import DefaultScope, init_default_scope

__all__ = ['load_config', 'build_model', 'init_model', 'dummy_forward_module']

_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load a config (its ``custom_imports`` register SeTformer)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _registry(scope: str):
    if scope not in _SCOPES:
        raise ValueError(f'default_scope must be one of {_SCOPES}, got '
                         f'{scope!r}')
    import importlib
    return importlib.import_module(f'{scope}.registry').MODELS


def build_model(cfg: Config):
    """Build ``cfg.model`` in the registry of ``cfg.default_scope``."""
    import mmsetformer  # noqa: F401  (registers SeTformer)
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        model = _registry(scope).build(cfg.model)
    return model


def init_model(config, checkpoint: Optional[str] = None, device='cpu',
               cfg_options: Optional[dict] = None):
    """Model of a config, optionally with (safely loaded) trained weights."""
    cfg = config if isinstance(config, Config) else load_config(
        config, cfg_options)
    if checkpoint:
        # trained weights replace any backbone init, so do not require it
        cfg.model.get('backbone', {}).pop('init_cfg', None)
    model = build_model(cfg)
    if checkpoint:
        from .checkpoint import safe_load, select_weights
        ckpt = safe_load(checkpoint, 'cpu')
        missing, _ = model.load_state_dict(select_weights(ckpt),
                                           strict=False)
        if missing:
            raise KeyError(f'{checkpoint} lacks {len(missing)} weights of '
                           f'this model, e.g. {missing[:3]}')
        meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
        if 'dataset_meta' in meta:
            model.dataset_meta = meta['dataset_meta']
    else:
        model.init_weights()
    model.cfg = cfg
    return model.to(device).eval()


class _TensorForward(torch.nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-input module,
    for tracing (FLOPs) and timing of whole detectors/segmentors."""

    def __init__(self, model, scope: str):
        super().__init__()
        self.model = model
        self.scope = scope

    def forward(self, inputs: torch.Tensor):
        samples = None
        if self.scope == 'mmdet':
            from mmdet.structures import DetDataSample
            h, w = inputs.shape[-2:]
            meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                        batch_input_shape=(h, w), scale_factor=(1., 1.))
            samples = [DetDataSample(metainfo=meta) for _ in inputs]
        return self.model(inputs, samples, mode='tensor')


def dummy_forward_module(model, scope: str) -> torch.nn.Module:
    return _TensorForward(model, scope)


def parse_shape(shape: Sequence[int]):
    if len(shape) == 1:
        return (shape[0], shape[0])
    if len(shape) == 2:
        return tuple(shape)
    raise ValueError(f'--shape takes 1 or 2 ints, got {shape}')
