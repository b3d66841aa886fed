# UperNet + SeTformer-T, ADE20K, 160k iterations, Swin's recipe: 512 x 512
# crops, AdamW 6e-5, weight decay 0.01, batch 16 (8 GPUs x 2), 1500
# iterations of linear warm-up then linear decay. Single-scale test by
# default; multi-scale + flip with `tools/test.py ... --tta`.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'  # noqa
]
custom_imports = dict(imports=['mmsetformer'], allow_failed_imports=False)

# ImageNet-1K classifier checkpoint (configs/setformer_t_in1k.py); the
# backbone's references are resampled from m=500 to m=800 on loading.
# Train from scratch with --cfg-options model.backbone.init_cfg=None
pretrained = 'checkpoints/setformer_t_in1k.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='SeTformer',
        arch='t',
        num_refs=800,
        eps=0.3,
        sigma=0.8,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[56, 112, 224, 448]),
    auxiliary_head=dict(in_channels=224))

# No weight decay on norms, biases and SeT references.
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.,
        bias_decay_mult=0.,
        custom_keys={'.refs': dict(decay_mult=0.)}))

# lr 6e-5 is for 16 images per step; other GPU counts scale it linearly.
auto_scale_lr = dict(enable=True, base_batch_size=16)
