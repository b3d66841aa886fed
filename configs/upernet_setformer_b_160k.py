_base_ = ['./upernet_setformer_t_160k.py']
pretrained = 'checkpoints/setformer_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='b',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[80, 160, 320, 640]),
    auxiliary_head=dict(in_channels=320))
