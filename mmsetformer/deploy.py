"""Export of trained models (ONNX; torch.export programs) with dynamic
H x W, checked against PyTorch; behind ``tools/export.py``.

What exports: the backbone of any config (NCHW maps per ``out_indices``),
and whole models whose library gives a plain tensor-mode forward: an
mmpretrain classifier (logits) and an mmseg segmentor (per-pixel logits at
the input size). mmdet's detectors need NMS and RoI ops in their forward,
which have no ONNX form here (mmdeploy's territory): their backbone
exports.
"""
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'export_targets', 'build_export_module', 'make_traceable', 'export_onnx',
    'export_program', 'check_export', 'preprocess_info'
]

TASK_OF_SCOPE = {'mmdet': 'detection', 'mmseg': 'segmentation',
                 'mmpretrain': 'classification'}


def export_targets(scope: str) -> Tuple[str, ...]:
    """What a config of ``scope`` can export, the default first."""
    return ('backbone', ) if scope == 'mmdet' else ('model', 'backbone')


class BackboneExport(nn.Module):
    """The backbone alone: image -> its stage maps."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.output_names = [f'stage{i}' for i in backbone.out_indices]
        self.output_strides = [4 * 2**i for i in backbone.out_indices]

    def forward(self, x: torch.Tensor):
        return tuple(self.backbone(x))


class ClassifierExport(nn.Module):
    """mmpretrain classifier, tensor mode: image -> logits (B, classes)."""
    output_names = ['logits']
    output_strides = [None]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x, mode='tensor')


class SegmentorExport(nn.Module):
    """mmseg encoder-decoder, tensor mode, with the logits resized to the
    input (as its whole-image inference does): image -> (B, K, H, W)."""
    output_names = ['seg_logits']
    output_strides = [1]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.align_corners = bool(getattr(model, 'align_corners', False))

    def forward(self, x: torch.Tensor):
        logits = self.model(x, mode='tensor')
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear',
                             align_corners=self.align_corners)


def build_export_module(model: nn.Module, scope: str,
                        target: str) -> nn.Module:
    """The module to export: ``target`` is ``'backbone'`` or ``'model'``."""
    if target not in export_targets(scope):
        raise ValueError(
            f'{TASK_OF_SCOPE.get(scope, scope)} models export as '
            f'{" or ".join(export_targets(scope))}, not {target!r}'
            + (": mmdet's detectors need NMS and RoI ops in their forward "
               'that have no ONNX form here (use mmdeploy for whole '
               'detectors); the backbone exports' if scope == 'mmdet'
               else ''))
    if target == 'backbone':
        module = BackboneExport(model.backbone)
    elif scope == 'mmpretrain':
        module = ClassifierExport(model)
    else:
        module = SegmentorExport(model)
    return make_traceable(module.eval())


def _bins(n, k: int, like: torch.Tensor) -> torch.Tensor:
    """(k, n) averaging matrix of adaptive pooling of n cells into k bins:
    bin i averages cells [floor(i n / k), ceil((i + 1) n / k))."""
    i = torch.arange(k, device=like.device)
    start = torch.div(i * n, k, rounding_mode='floor')
    end = torch.div((i + 1) * n + k - 1, k, rounding_mode='floor')
    cells = torch.arange(n, device=like.device)
    inside = (cells[None] >= start[:, None]) & (cells[None] < end[:, None])
    weights = inside.to(like.dtype)
    return weights / weights.sum(1, keepdim=True)


class TraceableAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two matrix products whose bins are
    computed from the input size: the same numbers, and it traces into an
    ONNX graph that stays exact for any H x W (the ONNX exporters bake the
    export size into adaptive pooling, e.g. UperNet's pyramid pooling)."""

    def __init__(self, output_size):
        super().__init__()
        if isinstance(output_size, int) or output_size is None:
            output_size = (output_size, output_size)
        self.output_size = tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self.output_size
        h, w = x.shape[-2], x.shape[-1]
        if oh is None:
            oh = h
        if ow is None:
            ow = w
        rows = _bins(h, oh, x)
        cols = _bins(w, ow, x)
        return rows @ x @ cols.transpose(0, 1)


def make_traceable(module: nn.Module) -> nn.Module:
    """Swap, in place, every adaptive average pooling with output size
    other than 1 x 1 for :class:`TraceableAdaptiveAvgPool2d`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if size not in (1, (1, 1)):
                    setattr(parent, name, TraceableAdaptiveAvgPool2d(size))
    return module


def _outputs(module, x) -> List[torch.Tensor]:
    with torch.no_grad():
        out = module(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _quiet():
    """The tracer's warnings about Python-side shape checks (they are
    checks, evaluated once, and the check below covers the result)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter('ignore', torch.jit.TracerWarning)
    warnings.filterwarnings('ignore', message='.*legacy TorchScript-based '
                            'ONNX export.*')
    return ctx


def export_onnx(module: nn.Module,
                path: str,
                shape: Sequence[int],
                batch: int = 1,
                opset: Optional[int] = None,
                exporter: str = 'torchscript') -> None:
    """ONNX file of ``module`` with input ``image`` (batch, 3, H, W) and
    dynamic H x W. ``exporter``: ``'torchscript'`` (torch's tracing
    exporter: seconds) or ``'dynamo'`` (torch.export based: minutes here,
    needs onnxscript)."""
    x = torch.randn(batch, 3, *shape)
    names = list(module.output_names)
    ctx = _quiet()
    try:
        if exporter == 'torchscript':
            axes = {'image': {2: 'height', 3: 'width'}}
            for name, stride in zip(names, module.output_strides):
                if stride is not None:
                    axes[name] = {2: f'{name}_height', 3: f'{name}_width'}
            torch.onnx.export(module, (x, ), path, dynamo=False,
                              input_names=['image'], output_names=names,
                              dynamic_axes=axes, opset_version=opset or 17)
        elif exporter == 'dynamo':
            dim = torch.export.Dim.DYNAMIC
            torch.onnx.export(module, (x, ), path, dynamo=True,
                              input_names=['image'], output_names=names,
                              dynamic_shapes=({2: dim, 3: dim}, ),
                              opset_version=opset or 18)
        else:
            raise ValueError(f"exporter must be 'torchscript' or 'dynamo', "
                             f'got {exporter!r}')
    finally:
        ctx.__exit__(None, None, None)


def export_program(module: nn.Module, path: str, shape: Sequence[int],
                   batch: int = 1) -> None:
    """``torch.export`` program with dynamic H x W, saved with
    ``torch.export.save`` (``.pt2``: ``torch.export.load(path).module()``
    runs it; AOTInductor and ExecuTorch start from it). TorchScript files
    are not offered: ``torch.jit.trace`` records the SeT operator (a custom
    autograd function) as a Python call, which cannot be saved."""
    x = torch.randn(batch, 3, *shape)
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(module, (x, ),
                                  dynamic_shapes=({2: dim, 3: dim}, ))
    torch.export.save(program, path)


def _runner(fmt: str, path: str):
    if fmt == 'onnx':
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # no constant-folding chatter
        sess = ort.InferenceSession(path, opts,
                                    providers=['CPUExecutionProvider'])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x.numpy()})
    loaded = torch.export.load(path).module()

    def run(x):
        with torch.no_grad():
            out = loaded(x)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        return [o.numpy() for o in out]

    return run


def check_export(module: nn.Module, fmt: str, path: str,
                 shapes: Sequence[Sequence[int]], batch: int = 1,
                 seed: int = 0) -> List[Dict]:
    """Run the exported file (ONNX Runtime, or torch.export.load) and
    ``module`` on the same random images at each of ``shapes``; per shape
    and output: the largest absolute difference."""
    run = _runner(fmt, path)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape in shapes:
        x = torch.randn(batch, 3, *shape, generator=gen)
        ref = _outputs(module, x)
        got = run(x)
        if len(got) != len(ref):
            raise RuntimeError(f'{path} returns {len(got)} outputs, PyTorch '
                               f'{len(ref)}')
        for name, r, g in zip(module.output_names, ref, got):
            r = r.numpy()
            if r.shape != g.shape:
                rows.append(dict(shape=tuple(shape), output=name,
                                 max_abs_diff=float('inf'),
                                 note=f'shape {g.shape} != {r.shape}'))
                continue
            rows.append(dict(shape=tuple(shape), output=name,
                             out_shape=tuple(r.shape),
                             max_abs_diff=float(np.abs(g - r).max()),
                             max_abs=float(np.abs(r).max())))
    return rows


def preprocess_info(cfg) -> Dict:
    """How an image becomes the exported model's input (from the config's
    data preprocessor)."""
    pre = cfg.model.get('data_preprocessor') or cfg.get(
        'data_preprocessor') or {}
    info = dict(layout='NCHW float32')
    if 'mean' in pre:
        info['mean'] = [float(v) for v in pre['mean']]
    if 'std' in pre:
        info['std'] = [float(v) for v in pre['std']]
    rgb = pre.get('bgr_to_rgb', pre.get('to_rgb', False))
    info['channel_order'] = 'RGB' if rgb else 'BGR'
    info['note'] = ('input = (image in channel_order - mean) / std, '
                    'pixel values 0-255')
    return info
