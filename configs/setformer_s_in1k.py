_base_ = ['./setformer_t_in1k.py']
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3), head=dict(in_channels=512))
