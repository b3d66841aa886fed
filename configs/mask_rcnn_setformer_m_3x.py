_base_ = ['./mask_rcnn_setformer_t_3x.py']
pretrained = 'checkpoints/setformer_m_in1k.pth'
model = dict(
    backbone=dict(
        arch='m',
        drop_path_rate=0.1,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[56, 112, 224, 448]))
