"""The installed stack is the real one: compiled mmcv ops and all libraries
importable side by side with mmsetformer."""
import importlib

import pytest
import torch


def test_mmcv_compiled_nms_on_cpu():
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # box 1 overlaps box 0 with IoU 81/119 > 0.5 and is suppressed
    assert keep.tolist() == [0, 2]
    assert torch.allclose(dets[:, 4], torch.tensor([0.9, 0.7]))


def test_mmcv_compiled_roi_align_on_cpu():
    from mmcv.ops import RoIAlign
    feat = torch.arange(16.).view(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 4., 4.]])  # whole map
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2,
                   aligned=True)(feat, rois)
    # With pixel-aligned sampling each bin is exactly its 2x2 quadrant mean.
    quadrants = feat.view(2, 2, 2, 2).permute(0, 2, 1, 3).mean((-2, -1))
    assert torch.allclose(out.view(2, 2), quadrants)
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_mmcv_ext_is_compiled():
    ext = importlib.import_module('mmcv._ext')
    assert hasattr(ext, 'nms') and hasattr(ext, 'roi_align_forward')


@pytest.mark.parametrize('lib', ['mmdet', 'mmseg', 'mmpretrain', 'timm'])
def test_mmsetformer_registers_next_to(lib):
    mod = importlib.import_module(lib)
    import mmsetformer
    assert mod is not None
    assert lib in mmsetformer.registry.REGISTERED
