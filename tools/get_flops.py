"""Params and FLOPs of a SeTformer variant or of any config's model.

    python tools/get_flops.py t                      # backbone, 224 x 224
    python tools/get_flops.py b --num-refs 500 --shape 224
    python tools/get_flops.py configs/mask_rcnn_setformer_t_3x.py \
        --shape 800 1280

FLOPs follow mmengine's (fvcore's) convention, one multiply-add = one FLOP,
with SeT's kernel and Sinkhorn matmuls included; ``FLOPs (all ops)`` also
counts every element-wise op (exp, scalings) at one FLOP per element.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmsetformer.analysis import complexity  # noqa: E402
from mmsetformer.apis import (DictAction, build_model,  # noqa: E402
                              dummy_forward_module, load_config, parse_shape)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('target', help='variant (m/t/s/b) or config file')
    p.add_argument('--shape', type=int, nargs='+', default=None,
                   help='input H [W] (224 for variants, 800 1333 for mmdet '
                   'configs, 512 for mmseg, 224 for mmpretrain)')
    p.add_argument('--num-refs', type=int, default=500,
                   help='references m for a bare variant (default 500)')
    p.add_argument('--num-classes', type=int, default=1000,
                   help='classifier head added to a bare variant')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p.parse_args()


def main():
    args = parse_args()
    import mmsetformer  # noqa: F401
    if os.path.isfile(args.target):
        cfg = load_config(args.target, args.cfg_options)
        cfg.model.get('backbone', {}).pop('init_cfg', None)
        scope = cfg.get('default_scope', 'mmdet')
        default = dict(mmdet=(800, 1333), mmseg=(512, 512),
                       mmpretrain=(224, 224))[scope]
        shape = parse_shape(args.shape) if args.shape else default
        model = dummy_forward_module(build_model(cfg), scope)
        name = os.path.basename(args.target)
    else:
        import timm
        shape = parse_shape(args.shape or [224])
        model = timm.create_model(f'setformer_{args.target.lower()}',
                                  num_refs=args.num_refs,
                                  num_classes=args.num_classes)
        name = f'SeTformer-{args.target.upper()} (m={args.num_refs}, ' \
            f'{args.num_classes}-class head)'
    res = complexity(model, (torch.randn(1, 3, *shape), ))
    print(f'{name}\ninput shape:      1 x 3 x {shape[0]} x {shape[1]}\n'
          f'params:           {res["params"] / 1e6:.2f} M\n'
          f'FLOPs:            {res["flops"] / 1e9:.2f} G\n'
          f'FLOPs (all ops):  {res["flops_all"] / 1e9:.2f} G')


if __name__ == '__main__':
    main()
