_base_ = ['./cascade_mask_rcnn_setformer_t_3x.py']
pretrained = 'checkpoints/setformer_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='s',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
