# Automatic mixed precision (fp16 autocast + dynamic loss scaling); SeT's
# kernel and Sinkhorn stay in fp32 inside the operator.
_base_ = ['./mask_rcnn_setformer_t_3x.py']
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
