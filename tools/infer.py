"""Run a trained model on your own images: a picture and the predictions of
every image, for detection, segmentation and classification (mmdet's
``DetInferencer``, mmseg's ``MMSegInferencer`` or mmpretrain's
``ImageClassificationInferencer``, chosen by the config's
``default_scope``).

    python tools/infer.py CONFIG CKPT photo.jpg more/*.png folder/ --out preds
    python tools/infer.py configs/mask_rcnn_setformer_t_3x.py CKPT \\
        'shots/**/*.jpg' --out preds --score-thr 0.5

Writes into ``--out``:
    vis/<name>.png      the image with its predictions drawn; small images
                        are scaled up (short side >= --min-size) first
    labels/<name>.png   segmentation only: the class index of every pixel,
                        at the image's own size
    predictions.json    per image: boxes (image pixels, x1 y1 x2 y2),
                        classes, scores and RLE masks / classes present /
                        top-k classes; and the images that were skipped

Files, folders (their images; --recursive for sub-folders) and globs
(quoted, ``**`` included) mix freely. An image that cannot be read is
reported and skipped and the others are still processed; the exit status
is then 1 (0 when every image was processed).
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys
import time
import warnings

import cv2
import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation',
         'mmpretrain': 'classification'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('config', help='the config the model was trained with')
    p.add_argument('checkpoint', help='trained weights')
    p.add_argument('images', nargs='+',
                   help='image files, folders and globs')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--device', default=None,
                   help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='detection: instances below this score are neither '
                   'drawn nor written (default 0.3; 0 keeps all)')
    p.add_argument('--topk', type=int, default=5,
                   help='classification: classes written per image')
    p.add_argument('--min-size', type=int, default=512,
                   help='pictures: scale images up to this short side '
                   '(default 512) so that labels stay legible')
    p.add_argument('--recursive', action='store_true',
                   help='take the images of sub-folders too')
    p.add_argument('--cfg-options', nargs='+', default=None,
                   help='override config settings, key=value')
    return p.parse_args(argv)


# -- inputs ---------------------------------------------------------------
def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS)


def _folder_images(folder: str, recursive: bool):
    if recursive:
        found = [osp.join(d, f) for d, _, files in os.walk(folder)
                 for f in files]
    else:
        found = [osp.join(folder, f) for f in os.listdir(folder)]
    return sorted(p for p in found if osp.isfile(p) and _is_image(p))


def expand_inputs(specs, recursive=False):
    """Image paths of files, folders and globs (in the order given, without
    duplicates) and the specs that named nothing, with the reason."""
    images, missing, seen = [], [], set()

    def add(path):
        key = osp.abspath(path)
        if key not in seen:
            seen.add(key)
            images.append(path)

    for spec in specs:
        if osp.isdir(spec):
            found = _folder_images(spec, recursive)
            if not found:
                missing.append((spec, 'folder holds no image ('
                                + ', '.join(IMAGE_EXTS) + ')'))
            for p in found:
                add(p)
        elif osp.isfile(spec):
            add(spec)  # named explicitly: tried whatever its extension
        elif glob.has_magic(spec):
            found = sorted(glob.glob(spec, recursive=True))
            files = [p for p in found if osp.isfile(p) and _is_image(p)]
            for d in (p for p in found if osp.isdir(p)):
                files += _folder_images(d, recursive)
            if not files:
                missing.append((spec, 'no image matches this pattern'))
            for p in files:
                add(p)
        else:
            missing.append((spec, 'no such file or folder'))
    return images, missing


def read_image(path: str) -> np.ndarray:
    """BGR uint8 image; raises ValueError if it cannot be decoded."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f'cannot read the file ({e.strerror})') from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ValueError('cannot decode it as an image (not an image, or '
                         'corrupt)')
    return img


def unique_names(paths):
    """A file name per image (its stem; ``_2``, ``_3`` on collisions)."""
    names, used = [], set()
    for p in paths:
        stem = osp.splitext(osp.basename(p))[0] or 'image'
        name, k = stem, 1
        while name in used:
            k += 1
            name = f'{stem}_{k}'
        used.add(name)
        names.append(name)
    return names


# -- model ----------------------------------------------------------------
def _config(args):
    from mmsetformer.apis import load_config
    cfg = load_config(args.config)
    if args.cfg_options:
        from mmengine.config import DictAction
        parser = argparse.ArgumentParser()
        parser.add_argument('--o', nargs='+', action=DictAction)
        cfg.merge_from_dict(parser.parse_args(['--o',
                                               *args.cfg_options]).o)
    # the trained weights replace any backbone init (pretrained file)
    backbone = cfg.model.get('backbone')
    if backbone is not None:
        backbone.pop('init_cfg', None)
    return cfg


def _checkpoint_meta(path: str) -> dict:
    from mmsetformer.checkpoint import safe_load
    ckpt = safe_load(path, 'cpu')
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    return meta.get('dataset_meta') or {}


def _config_meta(cfg) -> dict:
    """Classes and palette of the config's test dataset (for checkpoints
    that do not carry them)."""
    from mmengine.registry import DATASETS
    dataset = cfg.get('test_dataloader', {}).get('dataset')
    if dataset is None:
        return {}
    try:
        return dict(DATASETS.build(dict(dataset, lazy_init=True)).metainfo)
    except Exception as e:  # noqa: BLE001 (e.g. data not on this machine)
        warnings.warn(f'class names: cannot read the config dataset ({e})')
        return {}


def _palette(n: int, given=None):
    if given is not None and len(given) >= n and not isinstance(given, str):
        return [tuple(int(c) for c in color) for color in given[:n]]
    rng = np.random.RandomState(42)
    return [tuple(int(c) for c in rng.randint(40, 256, 3)) for _ in range(n)]


class Predictor:
    """One of the three inferencers, with the classes and palette of the
    checkpoint (or else the config)."""

    def __init__(self, cfg, checkpoint: str, device: str):
        from mmengine.registry import init_default_scope
        self.scope = cfg.get('default_scope', 'mmdet')
        if self.scope not in TASKS:
            raise ValueError(f'default_scope must be one of {list(TASKS)}, '
                             f'got {self.scope!r}')
        self.task = TASKS[self.scope]
        init_default_scope(self.scope)
        meta = _checkpoint_meta(checkpoint) or _config_meta(cfg)
        with warnings.catch_warnings():
            # the inferencers warn about default class names that the
            # lines below replace
            warnings.simplefilter('ignore', UserWarning)
            if self.scope == 'mmdet':
                from mmdet.apis import DetInferencer
                self.inferencer = DetInferencer(
                    model=cfg, weights=checkpoint, device=device,
                    show_progress=False)
            elif self.scope == 'mmseg':
                from mmseg.apis import MMSegInferencer
                self.inferencer = MMSegInferencer(
                    model=cfg, weights=checkpoint, device=device)
            else:
                from mmpretrain.apis import ImageClassificationInferencer
                self.inferencer = ImageClassificationInferencer(
                    model=cfg, pretrained=checkpoint, device=device)
        model = self.inferencer.model
        classes = meta.get('classes')
        if classes is None:
            classes = (getattr(model, 'dataset_meta', None) or getattr(
                model, '_dataset_meta', None) or {}).get('classes')
        num = self._num_classes(cfg)
        if classes is None or (num and len(classes) != num):
            classes = [f'class {i}' for i in range(num or 0)]
        self.classes = list(classes)
        self.palette = _palette(len(self.classes), meta.get('palette'))
        if self.scope == 'mmdet':
            model.dataset_meta = dict(classes=self.classes,
                                      palette=self.palette)
            self.inferencer.visualizer.dataset_meta = model.dataset_meta
        elif self.scope == 'mmseg':
            model.dataset_meta = dict(classes=self.classes,
                                      palette=self.palette)
            self.inferencer.visualizer.set_dataset_meta(
                self.classes, self.palette)
        else:
            self.inferencer.classes = self.classes
            from mmpretrain.visualization import UniversalVisualizer
            if self.inferencer.visualizer is None:
                self.inferencer.visualizer = UniversalVisualizer()

    @staticmethod
    def _num_classes(cfg):
        m = cfg.model
        for head in ('roi_head.bbox_head', 'decode_head', 'head'):
            node = m
            for key in head.split('.'):
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, (list, tuple)):
                node = node[-1]
            if isinstance(node, dict) and 'num_classes' in node:
                return node['num_classes']
        return None

    def __call__(self, img: np.ndarray):
        """Predictions (a data sample) for one BGR image."""
        if self.scope == 'mmdet':
            out = self.inferencer(img, return_datasamples=True,
                                  no_save_vis=True, no_save_pred=True)
            return out['predictions'][0]
        out = self.inferencer(img, return_datasamples=True)
        return out[0] if isinstance(out, list) else out


# -- results and pictures ---------------------------------------------------
def _scale_for(h: int, w: int, min_size: int) -> float:
    return max(1., min_size / max(1, min(h, w)))


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=list(rle['size']), counts=rle['counts'].decode())


def detection_record(pred, classes, score_thr):
    inst = pred.pred_instances
    keep = inst.scores >= score_thr
    inst = inst[keep]
    masks = inst.masks.cpu().numpy() if 'masks' in inst else None
    items = []
    for i in range(len(inst)):
        label = int(inst.labels[i])
        item = dict(label=label, **{'class': classes[label]},
                    score=round(float(inst.scores[i]), 4),
                    bbox=[round(float(v), 1) for v in inst.bboxes[i]])
        if masks is not None:
            item['mask'] = _rle(masks[i])
        items.append(item)
    return dict(instances=items), inst


def _font_pt(rgb: np.ndarray) -> float:
    """Label size: 13 pt on a 512 px short side, growing with the image."""
    return 13. * max(1., min(rgb.shape[:2]) / 512)


def draw_detection(visualizer, img, inst, classes, palette, scale,
                   out_file):
    """Masks, boxes and a label per instance on the scaled image. Labels
    sit above their box (inside it only at the top border), so they do not
    cover the object, at a size that stays legible (mmdet's visualizer
    draws boxes under 173 x 173 px with 6 pt labels inside the box)."""
    rgb = _rescaled_rgb(img, scale)
    h, w = rgb.shape[:2]
    visualizer.set_image(rgb)
    if len(inst):
        labels = inst.labels.tolist()
        colors = [tuple(palette[lb]) for lb in labels]
        if 'masks' in inst:
            masks = torch.nn.functional.interpolate(
                inst.masks.float()[None], size=(h, w), mode='nearest')[0]
            visualizer.draw_binary_masks(masks.bool().numpy(),
                                         colors=colors, alphas=0.45)
        boxes = (inst.bboxes * scale).numpy()
        width = max(2, round(min(h, w) / 200))
        visualizer.draw_bboxes(boxes, edge_colors=colors,
                               line_widths=width)
        pt = _font_pt(rgb)
        px = pt * visualizer.dpi / 72  # font height in pixels
        label_h = 1.9 * px  # text and its background box
        placed = []
        for (x1, y1, _, y2), lb, score in zip(boxes, labels,
                                              inst.scores.tolist()):
            text = f'{classes[lb]} {score:.2f}'
            label_w = 0.62 * px * len(text)
            x = min(max(0., x1), max(0., w - label_w))
            # above the box, else inside its top, else below it: the first
            # place that no label of a higher score took
            spots = [y for y in (y1 - label_h, y1 + width, y2 + width)
                     if 0 <= y <= h - label_h] or [max(0., y1 - label_h)]
            y = next((y for y in spots if not any(
                x < ox + ow and ox < x + label_w and abs(y - oy) < label_h
                for ox, oy, ow in placed)), spots[0])
            placed.append((x, y, label_w))
            visualizer.draw_texts(
                text, np.array([x + 0.35 * px, y + 0.45 * px]),
                font_sizes=int(round(pt)), colors='white',
                bboxes=dict(facecolor='black', alpha=0.75, pad=0.35,
                            edgecolor='none'))
    cv2.imwrite(out_file, visualizer.get_image()[:, :, ::-1])


def segmentation_record(pred, classes, label_file):
    labels = pred.pred_sem_seg.data[0].cpu().numpy()
    dtype = np.uint8 if len(classes) <= 256 else np.uint16
    cv2.imwrite(label_file, labels.astype(dtype))
    ids, counts = np.unique(labels, return_counts=True)
    present = sorted(
        (dict(label=int(i), **{'class': classes[int(i)]
                               if int(i) < len(classes) else str(int(i))},
              fraction=round(float(c) / labels.size, 4))
         for i, c in zip(ids, counts)), key=lambda d: -d['fraction'])
    return dict(classes_present=present), labels


def draw_segmentation(visualizer, img, labels, scale, out_file):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    rgb = _rescaled_rgb(img, scale)
    up = cv2.resize(labels.astype(np.int32), (rgb.shape[1], rgb.shape[0]),
                    interpolation=cv2.INTER_NEAREST)
    sample = SegDataSample(pred_sem_seg=PixelData(
        data=torch.from_numpy(up)[None]))
    visualizer.alpha = 0.5  # the image shows through the class colours
    visualizer.add_datasample('pred', rgb, sample, draw_gt=False,
                              with_labels=True, out_file=out_file)


def classification_record(pred, classes, topk):
    scores = pred.pred_score.float().cpu()
    k = min(topk, scores.numel())
    top = scores.topk(k)
    items = [dict(label=int(i), **{'class': classes[int(i)]},
                  score=round(float(s), 4))
             for s, i in zip(top.values, top.indices)]
    return dict(items[0], topk=items)


def draw_classification(visualizer, img, pred, classes, scale, out_file):
    visualizer.visualize_cls(
        _rescaled_rgb(img, scale), pred, classes=classes, draw_gt=False,
        draw_score=True, out_file=out_file)


def _rescaled_rgb(img: np.ndarray, scale: float) -> np.ndarray:
    if scale != 1:
        img = cv2.resize(img, (round(img.shape[1] * scale),
                               round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(img[:, :, ::-1])


def _summary(task, record):
    if task == 'detection':
        return f'{len(record["instances"])} instances'
    if task == 'segmentation':
        top = record['classes_present'][:3]
        return ', '.join(f'{c["class"]} {100 * c["fraction"]:.0f}%'
                         for c in top)
    return f'{record["class"]} ({record["score"]:.2f})'


def main(argv=None) -> int:
    args = parse_args(argv)
    images, skipped = expand_inputs(args.images, args.recursive)
    skipped = [dict(image=p, error=e) for p, e in skipped]
    for s in skipped:
        print(f'skipped {s["image"]}: {s["error"]}', file=sys.stderr)
    if not images:
        print('no image to process', file=sys.stderr)
        return 1
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    import mmsetformer  # noqa: F401  (registers SeTformer)
    predictor = Predictor(_config(args), args.checkpoint, device)
    task = predictor.task
    vis_dir = osp.join(args.out, 'vis')
    os.makedirs(vis_dir, exist_ok=True)
    if task == 'segmentation':
        os.makedirs(osp.join(args.out, 'labels'), exist_ok=True)
    visualizer = predictor.inferencer.visualizer
    records = []
    start, n = time.time(), len(images)
    print(f'{task}: {n} image(s) with {osp.basename(args.config)} on '
          f'{device}', flush=True)
    for k, (path, name) in enumerate(zip(images, unique_names(images)), 1):
        t = time.time()
        try:
            img = read_image(path)
        except ValueError as e:
            skipped.append(dict(image=path, error=str(e)))
            print(f'[{k}/{n}] {path}: skipped, {e}', file=sys.stderr,
                  flush=True)
            continue
        h, w = img.shape[:2]
        pred = predictor(img)
        scale = _scale_for(h, w, args.min_size)
        vis_file = osp.join(vis_dir, name + '.png')
        if task == 'detection':
            record, inst = detection_record(pred, predictor.classes,
                                            args.score_thr)
            draw_detection(visualizer, img, inst, predictor.classes,
                           predictor.palette, scale, vis_file)
        elif task == 'segmentation':
            label_file = osp.join('labels', name + '.png')
            record, labels = segmentation_record(
                pred, predictor.classes, osp.join(args.out, label_file))
            record['label_map'] = label_file
            draw_segmentation(visualizer, img, labels, scale, vis_file)
        else:
            record = classification_record(pred, predictor.classes,
                                           args.topk)
            draw_classification(visualizer, img, pred, predictor.classes,
                                scale, vis_file)
        records.append(dict(image=path, width=w, height=h,
                            visualization=osp.join('vis', name + '.png'),
                            **record))
        done = time.time() - start
        eta = done / k * (n - k)
        print(f'[{k}/{n}] {path}: {_summary(task, record)} '
              f'({time.time() - t:.2f} s, ETA {eta:.0f} s)', flush=True)
    out = dict(config=args.config, checkpoint=args.checkpoint, task=task,
               classes=predictor.classes, images=records, skipped=skipped)
    with open(osp.join(args.out, 'predictions.json'), 'w') as f:
        json.dump(out, f, indent=1)
    print(f'{len(records)} of {n} image(s) processed in '
          f'{time.time() - start:.1f} s: pictures in {vis_dir}, '
          f'predictions in {osp.join(args.out, "predictions.json")}')
    if skipped:
        print(f'{len(skipped)} input(s) skipped:', file=sys.stderr)
        for s in skipped:
            print(f'  {s["image"]}: {s["error"]}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
