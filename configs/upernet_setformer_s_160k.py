_base_ = ['./upernet_setformer_t_160k.py']
pretrained = 'checkpoints/setformer_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='s',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
