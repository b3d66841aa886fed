"""A small, deterministic dataset of coloured shapes in real formats.

Scenes of circles, squares and triangles (several per image, random size,
rotation and colour within a per-class hue band, overlapping, on textured
noisy backgrounds) written as

* COCO instance annotations (boxes + RLE masks of the *visible* part of
  each shape): ``annotations/instances_{training,validation}.json`` with
  images in ``images/{training,validation}/``;
* ADE20K-style semantic maps: ``annotations/{training,validation}/*.png``
  beside the same images (0 = unlabelled, 1 = background, 2.. = shapes; the
  configs use ``reduce_zero_label=True`` as ADE20K does);
* ImageNet-style folders of single-shape crops: ``classification/{train,val}
  /<class>/*.jpg``.

Everything follows from the seed: the same call writes the same files.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', ) + CLASSES
PALETTE = [(220, 60, 60), (60, 200, 80), (70, 110, 230)]
SEG_PALETTE = [(40, 40, 40)] + PALETTE
# Hue bands (OpenCV hue, 0-180) per class: colour helps, shape decides
# within the overlaps.
_HUES = {'circle': (0, 35), 'square': (25, 95), 'triangle': (85, 150)}
SPLITS = {'training': 'train', 'validation': 'val'}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour noise + a gradient + stripes or grain, uint8 BGR."""
    low = rng.uniform(60, 200, size=(4, 5, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-25, 25, w, dtype=np.float32)[None, :, None]
    img += ramp * rng.choice([-1, 1])
    if rng.random() < 0.5:  # stripes texture
        period = rng.uniform(6, 16)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        img += (np.sin(phase) * rng.uniform(8, 20))[..., None]
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cls: str, cx: float, cy: float, r: float,
             angle: float) -> np.ndarray:
    if cls == 'circle':
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    elif cls == 'square':
        t = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi + angle
    else:
        t = np.array([0, 2 / 3, 4 / 3]) * np.pi + angle - np.pi / 2
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _colour(rng: np.random.Generator, cls: str) -> Tuple[int, int, int]:
    hsv = np.array([[[rng.integers(*_HUES[cls]), rng.integers(140, 256),
                      rng.integers(150, 256)]]], dtype=np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def render_scene(rng: np.random.Generator, h: int, w: int,
                 num_objects: Tuple[int, int] = (1, 5),
                 scale: Tuple[float, float] = (0.08, 0.3)):
    """One scene: image (h, w, 3) uint8 BGR, instances [(label, mask)] with
    visible masks, and a semantic map (0-based over ``SEG_CLASSES``)."""
    img = _background(rng, h, w)
    sem = np.zeros((h, w), np.uint8)
    masks: List[np.ndarray] = []
    labels: List[int] = []
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        for _attempt in range(20):
            label = int(rng.integers(len(CLASSES)))
            r = rng.uniform(*scale) * min(h, w)
            cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(
                r * 0.6, h - r * 0.6)
            poly = _polygon(CLASSES[label], cx, cy, r, rng.uniform(0, np.pi))
            m = np.zeros((h, w), np.uint8)
            cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
            # keep every earlier shape at least 60 % visible
            if m.sum() >= 30 and all(
                    (prev & (1 - m)).sum() >= 0.6 * prev.sum()
                    for prev in masks):
                break
        else:
            continue
        for i, prev in enumerate(masks):
            masks[i] = prev & (1 - m)
        masks.append(m)
        labels.append(label)
        img[m.astype(bool)] = _colour(rng, CLASSES[label])
        sem[m.astype(bool)] = label + 1
    # light shading noise over the shapes too
    noise = rng.normal(0, 4, size=img.shape)
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img, list(zip(labels, masks)), sem


def _coco_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a binary mask (exact, unlike a polygon of its
    contour, so boxes, masks and areas agree to the pixel)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle['size']],
                counts=rle['counts'].decode('ascii'))


def generate(out_dir: str,
             num_train: int = 200,
             num_val: int = 50,
             size: Tuple[int, int] = (128, 160),
             num_cls_per_class: Optional[Tuple[int, int]] = (30, 10),
             cls_size: int = 64,
             seed: int = 0,
             log=print) -> Dict[str, int]:
    """Write the dataset under ``out_dir``; returns image counts per split.

    ``num_cls_per_class`` = (train, val) single-shape images per class for
    the classification folders (None skips them).
    """
    h, w = size
    counts = {}
    for split, num in (('training', num_train), ('validation', num_val)):
        rng = np.random.default_rng([seed, 0 if split == 'training' else 1])
        img_dir = osp.join(out_dir, 'images', split)
        ann_dir = osp.join(out_dir, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        images, annotations = [], []
        for idx in range(num):
            img, instances, sem = render_scene(rng, h, w)
            name = f'{idx:06d}'
            cv2.imwrite(osp.join(img_dir, name + '.jpg'), img,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            # ADE20K-style: 0 is "unlabelled" (ignored), classes from 1
            cv2.imwrite(osp.join(ann_dir, name + '.png'), sem + 1)
            images.append(dict(id=idx + 1, file_name=f'{split}/{name}.jpg',
                               height=h, width=w))
            for label, mask in instances:
                ys, xs = np.nonzero(mask)
                x0, y0 = float(xs.min()), float(ys.min())
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=idx + 1,
                    category_id=label + 1, iscrowd=0,
                    area=float(mask.sum()),
                    bbox=[x0, y0, float(xs.max()) + 1 - x0,
                          float(ys.max()) + 1 - y0],
                    segmentation=_coco_rle(mask)))
        coco = dict(
            info=dict(description='mmsetformer shapes', version='1.0'),
            images=images, annotations=annotations,
            categories=[dict(id=i + 1, name=c, supercategory='shape')
                        for i, c in enumerate(CLASSES)])
        with open(osp.join(out_dir, 'annotations',
                           f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
        counts[split] = num
        log(f'shapes: {num} {split} scenes, {len(annotations)} instances')
    if num_cls_per_class:
        for split, per_class in zip(('train', 'val'), num_cls_per_class):
            rng = np.random.default_rng([seed, 2 if split == 'train' else 3])
            for label, cls in enumerate(CLASSES):
                d = osp.join(out_dir, 'classification', split, cls)
                os.makedirs(d, exist_ok=True)
                for idx in range(per_class):
                    img = _single_shape(rng, cls_size, cls)
                    cv2.imwrite(osp.join(d, f'{idx:05d}.jpg'), img,
                                [cv2.IMWRITE_JPEG_QUALITY, 95])
            counts[f'cls_{split}'] = per_class * len(CLASSES)
        log(f'shapes: classification folders {num_cls_per_class} per class')
    return counts


def _single_shape(rng: np.random.Generator, size: int, cls: str):
    img = _background(rng, size, size)
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    poly = _polygon(cls, cx, cy, r, rng.uniform(0, np.pi))
    cv2.fillPoly(img, [np.round(poly).astype(np.int32)], _colour(rng, cls))
    return img
