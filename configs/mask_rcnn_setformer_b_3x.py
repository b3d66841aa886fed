_base_ = ['./mask_rcnn_setformer_t_3x.py']
pretrained = 'checkpoints/setformer_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='b',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 320, 640]))
