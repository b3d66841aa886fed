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


def test_import_survives_transformers_5(tmp_path):
    """mmpretrain 1.2's BLIP code fails to import with transformers >= 5,
    taking `mmpretrain.models` and `mmdet.models` down with it; `import
    mmsetformer` first makes its multimodal models placeholders."""
    import subprocess
    import sys
    fake = tmp_path / 'site'  # a transformers 5 that lacks what BLIP needs
    (fake / 'transformers').mkdir(parents=True)
    (fake / 'transformers' / '__init__.py').write_text('')
    info = fake / 'transformers-5.0.0.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(
        'Metadata-Version: 2.1\nName: transformers\nVersion: 5.0.0\n')
    env = dict(__import__('os').environ, PYTHONPATH=str(fake))

    def run(code):
        return subprocess.run([sys.executable, '-c', code], env=env,
                              capture_output=True, text=True, timeout=300)
    broken = run('import mmpretrain.models')
    assert broken.returncode != 0  # the problem is real
    fixed = run('import mmsetformer, mmdet.models, mmpretrain.models\n'
                'from mmpretrain.utils.dependency import WITH_MULTIMODAL\n'
                'from mmpretrain.registry import MODELS\n'
                'assert not WITH_MULTIMODAL\n'
                "assert MODELS.get('SeTformer') is not None\n"
                "assert MODELS.get('BlipCaption') is not None\n")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
