"""Shrunken copies of the real recipe configs for end-to-end tests: the
recipe config is the ``_base_``; only sizes, data paths and lengths change.
"""
import os.path as osp

from mmsetformer.data.shapes import CLASSES, PALETTE, SEG_CLASSES, SEG_PALETTE

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_ARCH = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                 num_heads=[1, 2, 2, 4], mlp_ratio=2.)
TINY_DIMS = TINY_ARCH['embed_dims']


def _backbone():
    return (f"dict(arch=dict(_delete_=True, **{TINY_ARCH!r}), num_refs=16, "
            "drop_path_rate=0.0, "
            'init_cfg=None)')


def det_config(data_root: str, epochs: int = 1, base: str =
               'mask_rcnn_setformer_t_3x.py') -> str:
    return f'''
_base_ = [{osp.join(ROOT, 'configs', base)!r}]
data_root = {data_root.rstrip('/') + '/'!r}
metainfo = dict(classes={CLASSES!r}, palette={PALETTE!r})
model = dict(
    backbone={_backbone()},
    neck=dict(in_channels={TINY_DIMS!r}, out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32,
                       num_classes=3)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(160, 128), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
         'img_shape', 'scale_factor'))]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_training.json',
                 data_prefix=dict(img='images/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_validation.json',
                 data_prefix=dict(img='images/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root +
                     'annotations/instances_validation.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={epochs})
default_hooks = dict(logger=dict(interval=1))
log_processor = dict(window_size=1)
randomness = dict(seed=0)
'''


def seg_config(data_root: str, iters: int = 4, ckpt_interval: int = 2) -> str:
    return f'''
_base_ = [{osp.join(ROOT, 'configs', 'upernet_setformer_t_160k.py')!r}]
data_root = {data_root!r}
crop_size = (64, 64)
metainfo = dict(classes={SEG_CLASSES!r}, palette={SEG_PALETTE!r})
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone={_backbone()},
    decode_head=dict(in_channels={TINY_DIMS!r}, channels=32, num_classes=4),
    auxiliary_head=dict(in_channels={TINY_DIMS[2]}, channels=16,
                        num_classes=4))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(160, 128), ratio_range=(0.5, 2.0),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale_factor=r, keep_ratio=True)
         for r in (0.75, 1.0, 1.25)],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])]
dataset = dict(type='BaseSegDataset', data_root=data_root,
               metainfo=metainfo, reduce_zero_label=True,
               img_suffix='.jpg', seg_map_suffix='.png')
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, data_prefix=dict(
        img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, data_prefix=dict(
        img_path='images/validation',
        seg_map_path='annotations/validation'), pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval={ckpt_interval}))
log_processor = dict(window_size=1)
randomness = dict(seed=0)
'''


def cls_config(data_root: str, epochs: int = 1) -> str:
    cls_root = osp.join(data_root, 'classification')
    return f'''
_base_ = [{osp.join(ROOT, 'configs', 'setformer_t_in1k.py')!r}]
data_root = {cls_root!r}
data_preprocessor = dict(num_classes=3)
model = dict(
    backbone={_backbone()},
    head=dict(num_classes=3, in_channels={TINY_DIMS[-1]}))
bgr_mean = [103.53, 116.28, 123.675]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=48, backend='pillow',
         interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandAugment', policies='timm_increasing', num_policies=2,
         total_level=10, magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[round(x) for x in bgr_mean],
                      interpolation='bicubic')),
    dict(type='RandomErasing', erase_prob=0.25, mode='rand',
         min_area_ratio=0.02, max_area_ratio=1 / 3, fill_color=bgr_mean),
    dict(type='PackInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=56, edge='short', backend='pillow',
         interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=48),
    dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=6, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                 data_prefix='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=6, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                 data_prefix='val', pipeline=test_pipeline))
test_dataloader = val_dataloader
# top-5 needs 5 classes; the shapes have 3, so top-1 and top-3
val_evaluator = dict(type='Accuracy', topk=(1, 3))
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={epochs})
default_hooks = dict(logger=dict(interval=1))
log_processor = dict(window_size=1)
randomness = dict(seed=0)
'''
