# SeTformer-T on ImageNet-1K, Swin's recipe (batch 1024 = 16 GPUs x 64,
# AdamW lr 1e-3, wd 0.05, RandAugment, Mixup 0.8 / CutMix 1.0, label
# smoothing 0.1, random erasing 0.25): 300 epochs = 20 warm-up, cosine
# decay to 1e-5 until epoch 290, then 10 cool-down epochs at 1e-5.
_base_ = ['mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py']
custom_imports = dict(imports=['mmsetformer'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='SeTformer',
        arch='t',
        num_refs=500,
        eps=0.1,
        sigma=0.5,
        drop_path_rate=0.2,
        out_indices=(3, )),
    head=dict(in_channels=448))

# No weight decay on norms, biases (from Swin's recipe) and references.
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={'.refs': dict(decay_mult=0.0)}))

warmup_epochs = 20
cooldown_epochs = 10
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=warmup_epochs,
        convert_to_iter_based=True),
    # no scheduler after it: the lr stays at eta_min for the cool-down
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        by_epoch=True,
        begin=warmup_epochs,
        end=300 - cooldown_epochs,
        convert_to_iter_based=True)
]

# lr 1e-3 is for 1024 images per step; other GPU counts scale it linearly.
auto_scale_lr = dict(enable=True, base_batch_size=1024)
