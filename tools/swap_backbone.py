"""Write a config that swaps SeTformer into an mmdet/mmseg/mmpretrain one.

The written config is a short delta whose ``_base_`` is the upstream one:

    python tools/swap_backbone.py \\
        mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py \\
        --arch t --out my_upernet_setformer_t.py
    python tools/swap_backbone.py \\
        mmdet::retinanet/retinanet_r50_fpn_1x_coco.py --arch s \\
        --num-refs 750 --out my_retinanet.py --check

The upstream config is named the ``mmdet::`` / ``mmseg::`` /
``mmpretrain::`` way (the configs shipped inside the installed library) or
by path. The tool measures what the upstream backbone hands on (channels
and strides of its outputs) and writes: the SeTformer backbone with outputs
at the same strides, the in_channels of the neck (or of the heads that
read the backbone), the model-level ``pretrained`` cleared (mmseg passes
it to the backbone; ResNet checkpoints do not fit SeTformer), no weight
decay on the SeT references, and a comment on the checkpoint to load.
``--check`` then builds the written config and runs one training step and
one prediction on a small synthetic batch.
"""
import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arch(text: str):
    """``t`` or a dict (JSON or Python literal) for a custom arch."""
    text = text.strip()
    if not text.startswith('{'):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)


def _checkpoint(text: str):
    return None if text.lower() in ('none', '') else text


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n', 2)[2])
    p.add_argument('config', help="upstream config: 'mmdet::dir/name.py' "
                   "(also mmseg::, mmpretrain::) or a path")
    p.add_argument('--arch', type=_arch, default='t',
                   help="m, t, s, b, or a dict such as "
                   "'{\"embed_dims\": 32, \"depths\": 1, \"num_heads\": 1}' "
                   '(default t)')
    p.add_argument('--num-refs', type=int, default=None,
                   help='SeT references m (default: the paper recipe of '
                   'the task: 750 detection, 800 segmentation, 500 '
                   'classification)')
    p.add_argument('--eps', type=float, default=None,
                   help='entropic epsilon (default: recipe, 0.3 / 0.3 / 0.1)')
    p.add_argument('--sigma', type=float, default=None,
                   help='LPE bandwidth (default: recipe, 0.8 / 0.8 / 0.5)')
    p.add_argument('--drop-path-rate', type=float, default=None,
                   help="stochastic depth (default: this project's "
                   'recipes for the task and size)')
    p.add_argument('--checkpoint', type=_checkpoint, default='auto',
                   help='backbone checkpoint for init_cfg; "none" trains '
                   'from scratch (default: checkpoints/setformer_<arch>_'
                   'in1k.pth for detection and segmentation, none for '
                   'classification)')
    p.add_argument('--out', required=True, help='the config to write')
    p.add_argument('--check', action='store_true',
                   help='build the written config and run one training step '
                   'and one prediction on a synthetic batch (CPU)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmsetformer.swap import write_swapped_config
    plan = write_swapped_config(
        args.config, args.out, arch=args.arch, num_refs=args.num_refs,
        eps=args.eps, sigma=args.sigma, drop_path_rate=args.drop_path_rate,
        checkpoint=args.checkpoint)
    p = plan.probe
    print(f'{args.out}: {p.type} (channels {p.channels}) -> SeTformer '
          f'out_indices {tuple(p.stages)} (channels {plan.out_channels})')
    if args.check:
        from mmengine.config import Config

        from mmsetformer.swap import backbone_cfg
        from mmsetformer.swap_check import smoke_test
        cfg = Config.fromfile(args.out)
        backbone_cfg(cfg.model).pop('init_cfg', None)  # not needed here
        res = smoke_test(cfg)
        print(f'check: built, one training step (loss {res["loss"]:.3f}, '
              f'{res["grad_params"]}/{res["backbone_params"]} backbone '
              f'tensors with gradients) and one prediction '
              f'({res["num_preds"]} results) on a synthetic batch')
    return plan


if __name__ == '__main__':
    main()
