"""The embedded dataset and the main job (issue: demo on an embedded
default dataset)."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
from shrink import ROOT

from mmsetformer.data.shapes import CLASSES, SEG_CLASSES, generate


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    counts = generate(root, num_train=6, num_val=3, size=(96, 128),
                      num_cls_per_class=(4, 2), cls_size=48, seed=3,
                      log=lambda *_: None)
    return root, counts


def _tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(osp.join(d, f), 'rb') as fh:
                out[osp.relpath(osp.join(d, f), root)] = fh.read()
    return out


def test_generator_is_deterministic(tmp_path, data):
    root, _ = data
    again = str(tmp_path / 'again')
    generate(again, num_train=6, num_val=3, size=(96, 128),
             num_cls_per_class=(4, 2), cls_size=48, seed=3,
             log=lambda *_: None)
    assert _tree_bytes(root) == _tree_bytes(again)
    other = str(tmp_path / 'other')
    generate(other, num_train=6, num_val=3, size=(96, 128),
             num_cls_per_class=None, seed=4, log=lambda *_: None)
    a, b = _tree_bytes(root), _tree_bytes(other)
    assert a['images/training/000000.jpg'] != b['images/training/000000.jpg']


def test_coco_files_load_through_mmdet(data):
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    root, _ = data
    for split, n in (('training', 6), ('validation', 3)):
        ds = CocoDataset(
            data_root=root, ann_file=f'annotations/instances_{split}.json',
            data_prefix=dict(img='images/'), metainfo=dict(classes=CLASSES),
            filter_cfg=None, test_mode=True,
            pipeline=[dict(type='LoadImageFromFile'),
                      dict(type='LoadAnnotations', with_bbox=True,
                           with_mask=True)])
        assert len(ds) == n and ds.metainfo['classes'] == CLASSES
        item = ds[0]
        assert item['img'].shape == (96, 128, 3)
        assert len(item['gt_bboxes']) >= 1
        masks = item['gt_masks'].to_ndarray()
        # boxes are the tight boxes of the visible masks
        for box, mask in zip(item['gt_bboxes'].tensor.numpy(), masks):
            ys, xs = np.nonzero(mask)
            assert abs(box[0] - xs.min()) <= 1 and abs(box[2] - xs.max() -
                                                       1) <= 1
            assert abs(box[1] - ys.min()) <= 1 and abs(box[3] - ys.max() -
                                                       1) <= 1
        labels = set(item['gt_bboxes_labels'].tolist())
        assert labels <= {0, 1, 2}


def test_semantic_maps_load_through_mmseg_ade_style(data):
    from mmengine.registry import init_default_scope
    from mmseg.datasets import BaseSegDataset
    init_default_scope('mmseg')
    root, _ = data
    ds = BaseSegDataset(
        data_root=root, metainfo=dict(classes=SEG_CLASSES),
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations')])
    assert len(ds) == 3 and ds.metainfo['classes'] == SEG_CLASSES
    seg = ds[0]['gt_seg_map']
    assert seg.shape == (96, 128)
    # ADE20K convention: stored labels start at 1; after reduce_zero_label
    # the background is 0 and shapes are 1..3, nothing is ignored
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
    assert 0 in seg and len(np.unique(seg)) >= 2


def test_classification_folders_load_through_mmpretrain(data):
    from mmpretrain.datasets import CustomDataset
    root, _ = data
    ds = CustomDataset(data_root=osp.join(root, 'classification'),
                       data_prefix='train')
    assert len(ds) == 12 and tuple(ds.CLASSES) == CLASSES
    assert sorted(ds.get_gt_labels().tolist()) == sorted([0, 1, 2] * 4)


def _png_size(path):
    import cv2
    img = cv2.imread(path)
    assert img is not None and img.size > 0, path
    assert img.std() > 1, f'{path} is blank'
    return img.shape[:2]


def _quick_demo(task, out):
    proc = subprocess.run(
        [sys.executable, 'tools/demo.py', task, '--quick', '--out', out],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(osp.join(out, 'metrics.json')) as f:
        return json.load(f), proc.stdout


@pytest.mark.parametrize('task,keys', [
    ('det', ['coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
             'coco/segm_mAP_50']),
    ('seg', ['mIoU', 'mAcc', 'aAcc']),
])
def test_quick_demo_metrics_and_pictures(tmp_path, task, keys):
    out = str(tmp_path / task)
    metrics, stdout = _quick_demo(task, out)
    for k in keys:
        assert k in metrics and np.isfinite(metrics[k])
    assert f'Pictures and results in {out}' in stdout
    preds = sorted(os.listdir(osp.join(out, 'predictions')))
    assert len(preds) == 4  # every validation image of the quick data
    for p in preds:
        h, w = _png_size(osp.join(out, 'predictions', p))
        # the visualizers draw at the image size (GT | prediction for det)
        assert h == 128 and w in (160, 320)
    assert _png_size(osp.join(out, 'loss_curve.png')) == (480, 840)
    for stage in (0, 1):
        h, w = _png_size(osp.join(out, f'transport_plan_stage{stage}.png'))
        assert h > 300 and w > 600
    table = open(osp.join(out, 'results.md')).read()
    assert '| metric | value |' in table
    if task == 'det':
        # seeded and deterministic on the CPU: a second run, same metrics
        again, _ = _quick_demo(task, str(tmp_path / 'again'))
        assert again == metrics
