"""Dataset checks run by the tools before any dataloader worker starts, so a
bad dataset stops with a message that names the file, not a traceback from
inside a worker."""
import json
import os
import os.path as osp
from typing import List, Optional

from mmengine.logging import print_log

__all__ = ['DatasetError', 'check_dataset', 'check_coco', 'check_cfg_data']

IMG_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.ppm',
            '.pgm', '.webp')


class DatasetError(ValueError):
    """The dataset on disk cannot be used as configured."""


def _join(root: Optional[str], path: str) -> str:
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _listing(paths: List[str], limit: int = 5) -> str:
    more = f' (+{len(paths) - limit} more)' if len(paths) > limit else ''
    return ', '.join(paths[:limit]) + more


def check_coco(ann_file: str, img_dir: str, name: str = 'dataset',
               need_annotations: bool = True) -> dict:
    """Check a COCO instances file and its images; returns counts.

    Errors: missing/empty/invalid json, no images, missing image files,
    no annotations at all (when training). Logged, not fatal (mmdet skips
    them): boxes entirely outside their image or of zero size, and
    annotations of unknown images or categories.
    """
    if not osp.isfile(ann_file):
        raise DatasetError(f'{name}: annotation file not found: {ann_file}')
    if osp.getsize(ann_file) == 0:
        raise DatasetError(f'{name}: annotation file is empty: {ann_file}')
    try:
        with open(ann_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f'{name}: {ann_file} is not valid JSON ({e})') \
            from None
    missing_keys = [k for k in ('images', 'annotations', 'categories')
                    if k not in coco]
    if missing_keys:
        raise DatasetError(f'{name}: {ann_file} lacks COCO keys '
                           f'{missing_keys}')
    images = {im['id']: im for im in coco['images']}
    if not images:
        raise DatasetError(f'{name}: {ann_file} lists no images')
    missing = [im['file_name'] for im in images.values()
               if not osp.isfile(_join(img_dir, im['file_name']))]
    if missing:
        raise DatasetError(
            f'{name}: {len(missing)} of {len(images)} images listed in '
            f'{ann_file} are missing under {img_dir}: {_listing(missing)}')
    if need_annotations and not coco['annotations']:
        raise DatasetError(
            f'{name}: {ann_file} has no annotations, so training would '
            'filter out every image (filter_empty_gt)')
    cats = {c['id'] for c in coco['categories']}
    outside, unknown = [], []
    for ann in coco['annotations']:
        im = images.get(ann.get('image_id'))
        if im is None or ann.get('category_id') not in cats:
            unknown.append(str(ann.get('id')))
            continue
        x, y, w, h = ann.get('bbox', (0, 0, 0, 0))
        iw = min(x + w, im['width']) - max(x, 0)
        ih = min(y + h, im['height']) - max(y, 0)
        if w < 1 or h < 1 or iw <= 0 or ih <= 0:
            outside.append(str(ann.get('id')))
    if outside:
        print_log(f'{name}: {len(outside)} annotations lie outside their '
                  f'image or have no size and are skipped (ids '
                  f'{_listing(outside)})', logger='current', level=30)
    if unknown:
        print_log(f'{name}: {len(unknown)} annotations refer to unknown '
                  f'images or categories and are skipped (ids '
                  f'{_listing(unknown)})', logger='current', level=30)
    return dict(images=len(images), annotations=len(coco['annotations']),
                skipped=len(outside) + len(unknown))


def _images_in(folder: str, suffix: Optional[str] = None) -> List[str]:
    out = []
    for d, _, files in os.walk(folder):
        for f in files:
            if (f.endswith(suffix) if suffix else
                    f.lower().endswith(IMG_EXTS)):
                out.append(osp.relpath(osp.join(d, f), folder))
    return sorted(out)


def check_segmentation(img_dir: str, seg_dir: str, img_suffix: str,
                       seg_suffix: str, name: str = 'dataset') -> dict:
    """Every image has its label map (mmseg's folder layout)."""
    for d in (img_dir, seg_dir):
        if not osp.isdir(d):
            raise DatasetError(f'{name}: folder not found: {d}')
    imgs = _images_in(img_dir, img_suffix)
    if not imgs:
        raise DatasetError(f'{name}: no *{img_suffix} images in {img_dir}')
    missing = [i for i in imgs if not osp.isfile(
        osp.join(seg_dir, i[:-len(img_suffix)] + seg_suffix))]
    if missing:
        raise DatasetError(f'{name}: {len(missing)} of {len(imgs)} images in '
                           f'{img_dir} have no label map in {seg_dir}: '
                           f'{_listing(missing)}')
    return dict(images=len(imgs))


def check_dataset(ds: dict, name: str = 'dataset',
                  training: bool = True) -> Optional[dict]:
    """Check one dataset config of the formats this project uses; other
    dataset types (and wrappers) are left to their library."""
    ds = dict(ds)
    if 'dataset' in ds and isinstance(ds['dataset'], dict):  # wrappers
        return check_dataset(ds['dataset'], name, training)
    root = ds.get('data_root')
    prefix = ds.get('data_prefix') or {}
    if ds.get('ann_file', '').endswith('.json') and isinstance(
            prefix, dict) and 'img' in prefix:
        return check_coco(_join(root, ds['ann_file']),
                          _join(root, prefix['img']), name,
                          need_annotations=training)
    if isinstance(prefix, dict) and {'img_path', 'seg_map_path'} <= set(
            prefix) and not ds.get('ann_file'):
        return check_segmentation(
            _join(root, prefix['img_path']),
            _join(root, prefix['seg_map_path']),
            ds.get('img_suffix', '.jpg'), ds.get('seg_map_suffix', '.png'),
            name)
    if ds.get('type') == 'CustomDataset' and not ds.get('ann_file'):
        folder = _join(root, prefix if isinstance(prefix, str) else
                       prefix.get('img_path', ''))
        if not osp.isdir(folder) or not _images_in(folder):
            raise DatasetError(f'{name}: no images under {folder}')
        return dict(images=len(_images_in(folder)))
    return None


def check_cfg_data(cfg, splits=('train', 'val')) -> None:
    """Check the datasets of a config's dataloaders before training."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if loader and loader.get('dataset'):
            check_dataset(loader['dataset'], f'{split}_dataloader.dataset',
                          training=split == 'train')
