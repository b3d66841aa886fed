_base_ = ['./setformer_t_in1k.py']
model = dict(
    backbone=dict(arch='m', drop_path_rate=0.1), head=dict(in_channels=448))
