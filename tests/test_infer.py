"""After training (issue: inference on a user's own images): tools/infer.py
runs mmdet's, mmseg's and mmpretrain's inferencers on files, folders and
globs, writes a legible picture and the predictions of every image, and
skips (and reports) what it cannot read."""
import glob
import importlib.util
import json
import os.path as osp
import re

import cv2
import numpy as np
import torch
from shrink import ROOT


def _infer_main(args):
    spec = importlib.util.spec_from_file_location(
        'infer_tool', osp.join(ROOT, 'tools', 'infer.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args)


def _picture(path):
    img = cv2.imread(path)
    assert img is not None, path
    return img


def _drawn_on(picture, image_path):
    """Mean difference between a picture and its plain scaled image."""
    img = cv2.imread(image_path)
    plain = cv2.resize(img, picture.shape[1::-1],
                       interpolation=cv2.INTER_CUBIC)
    return np.abs(picture.astype(float) - plain).mean()


def test_detection_files_folders_globs_and_unreadable(trained, tmp_path,
                                                      capsys):
    cfg, ckpt = trained['det']
    root = str(trained['root'])
    # weights whose box classifier is sure of 'circle': real instances
    state = torch.load(ckpt)
    bias = state['state_dict']['roi_head.bbox_head.fc_cls.bias']
    bias[:] = torch.tensor([8., 0., 0., -8.])
    sure = str(tmp_path / 'sure.pth')
    torch.save(state, sure)
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not an image')
    out = str(tmp_path / 'out')
    code = _infer_main([
        cfg, sure,
        osp.join(root, 'images', 'validation'),  # a folder (4 images)
        osp.join(root, 'images', 'training', '*.jpg'),  # a glob (2)
        osp.join(root, 'images', 'validation', '000001.jpg'),  # again
        str(bad), str(tmp_path / 'missing.png'), '--out', out,
        '--cfg-options', 'model.test_cfg.rcnn.max_per_img=3'])
    printed = capsys.readouterr()
    log = printed.out + printed.err
    assert code == 1, log  # some inputs were skipped
    for k in range(1, 8):  # progress over the 7 files listed
        assert f'[{k}/7]' in log, log
    preds = json.load(open(osp.join(out, 'predictions.json')))
    assert preds['task'] == 'detection'
    assert preds['classes'] == ['circle', 'square', 'triangle']
    assert len(preds['images']) == 6
    skipped = {osp.basename(s['image']): s['error']
               for s in preds['skipped']}
    assert set(skipped) == {'broken.jpg', 'missing.png'}
    assert 'cannot decode' in skipped['broken.jpg']
    assert 'no such file' in skipped['missing.png']
    assert 'broken.jpg' in printed.err and 'missing.png' in printed.err
    from pycocotools import mask as mask_util
    pictures = set()
    for rec in preds['images']:
        assert (rec['width'], rec['height']) == (160, 128)
        assert len(rec['instances']) == 3
        for inst in rec['instances']:
            assert inst['class'] == 'circle' and inst['score'] > 0.9
            x1, y1, x2, y2 = inst['bbox']
            assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 128
            mask = mask_util.decode(inst['mask'])
            assert mask.shape == (128, 160)
        # scaled up 4x to a 512 px short side, with the predictions drawn
        pic = _picture(osp.join(out, rec['visualization']))
        assert pic.shape[:2] == (512, 640)
        assert _drawn_on(pic, rec['image']) > 2
        pictures.add(rec['visualization'])
    # two 000000.jpg (validation/, training/) get two pictures
    assert {'vis/000000.png', 'vis/000000_2.png'} <= pictures
    assert len(pictures) == 6


def test_segmentation_pictures_and_label_maps(trained, tmp_path, capsys):
    cfg, ckpt = trained['seg']
    folder = osp.join(str(trained['root']), 'images', 'validation')
    out = str(tmp_path / 'out')
    code = _infer_main([cfg, ckpt, folder, '--out', out, '--min-size',
                        '256'])
    assert code == 0
    assert re.search(r'4 of 4 image\(s\) processed', capsys.readouterr().out)
    preds = json.load(open(osp.join(out, 'predictions.json')))
    assert preds['task'] == 'segmentation' and not preds['skipped']
    assert len(preds['images']) == 4
    for rec in preds['images']:
        labels = cv2.imread(osp.join(out, rec['label_map']),
                            cv2.IMREAD_UNCHANGED)
        assert labels.shape == (128, 160) and labels.max() < 4
        fractions = {c['label']: c['fraction']
                     for c in rec['classes_present']}
        assert abs(sum(fractions.values()) - 1) < 1e-3
        for label, fraction in fractions.items():
            assert abs((labels == label).mean() - fraction) < 1e-3
        pic = _picture(osp.join(out, rec['visualization']))
        assert pic.shape[:2] == (256, 320)
        assert _drawn_on(pic, rec['image']) > 2


def test_classification_top_k(trained, tmp_path):
    cfg, ckpt = trained['cls']
    images = osp.join(str(trained['root']), 'classification', 'val', '*',
                      '*.jpg')
    out = str(tmp_path / 'out')
    assert _infer_main([cfg, ckpt, images, '--out', out]) == 0
    preds = json.load(open(osp.join(out, 'predictions.json')))
    assert preds['task'] == 'classification'
    assert len(preds['images']) == len(glob.glob(images)) == 3
    for rec in preds['images']:
        scores = [t['score'] for t in rec['topk']]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1) < 1e-3  # all 3 classes: softmax
        assert rec['class'] == rec['topk'][0]['class']
        assert rec['class'] in ('circle', 'square', 'triangle')
        pic = _picture(osp.join(out, rec['visualization']))
        assert min(pic.shape[:2]) == 512  # 56 x 56 images scaled up
        assert _drawn_on(pic, rec['image']) > 0.5
