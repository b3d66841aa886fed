_base_ = ['./setformer_t_in1k.py']
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.5), head=dict(in_channels=640))
