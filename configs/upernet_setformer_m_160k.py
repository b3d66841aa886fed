_base_ = ['./upernet_setformer_t_160k.py']
pretrained = 'checkpoints/setformer_m_in1k.pth'
model = dict(
    backbone=dict(
        arch='m',
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[56, 112, 224, 448]),
    auxiliary_head=dict(in_channels=224))
