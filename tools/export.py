"""Export a trained model with dynamic H x W and check the file against
PyTorch: ONNX (checked with ONNX Runtime) or a torch.export program.

    python tools/export.py CONFIG CKPT --format onnx
    python tools/export.py configs/upernet_setformer_t_160k.py CKPT \\
        --format onnx --shape 512 512 --out upernet_t.onnx
    python tools/export.py configs/mask_rcnn_setformer_t_3x.py CKPT \\
        --format onnx            # detectors: the backbone
    python tools/export.py CONFIG CKPT --format pt2   # torch.export.save

What exports (``--what``): ``model`` for classifiers (logits) and
segmentors (per-pixel logits at the input size), the default where
possible; ``backbone`` for any config (its NCHW stage maps). The input is
``image`` (batch, 3, H, W), normalised as the config's data preprocessor
says (written next to the file as ``<out>.json``); H and W are dynamic, the
batch size is fixed (``--batch``).

The file is then run on random images at the export size and at a second
size (``--check-shape``) next to the PyTorch model; the largest absolute
difference is printed and the exit status is 1 when it exceeds
``--tolerance``.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

FORMATS = {'onnx': '.onnx', 'pt2': '.pt2'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('config')
    p.add_argument('checkpoint', help="trained weights ('none': random "
                   'weights, for trying the export)')
    p.add_argument('--format', choices=sorted(FORMATS), default='onnx')
    p.add_argument('--what', choices=['model', 'backbone'], default=None,
                   help='whole model (classifiers, segmentors; default '
                   'where possible) or backbone (detectors)')
    p.add_argument('--out', help='output file (default: next to the '
                   'checkpoint, <config>_<what>.onnx / .pt2)')
    p.add_argument('--shape', type=int, nargs=2, default=[224, 224],
                   metavar=('H', 'W'), help='export size (default 224 224)')
    p.add_argument('--check-shape', type=int, nargs=2, default=None,
                   metavar=('H', 'W'),
                   help='second size to check (default: H - 32, W + 64)')
    p.add_argument('--batch', type=int, default=1,
                   help='batch size of the exported model (default 1)')
    p.add_argument('--opset', type=int, default=None,
                   help='ONNX opset (default 17; 18 with --dynamo)')
    p.add_argument('--dynamo', action='store_true',
                   help="ONNX: torch's torch.export-based exporter (needs "
                   'onnxscript; minutes instead of seconds here)')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='largest absolute difference accepted (1e-4)')
    p.add_argument('--no-check', action='store_true',
                   help='export only, do not compare with PyTorch')
    p.add_argument('--cfg-options', nargs='+', default=None,
                   help='override config settings, key=value')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from mmsetformer.apis import init_model, load_config
    from mmsetformer.deploy import (build_export_module, check_export,
                                    export_onnx, export_program,
                                    export_targets, preprocess_info)
    cfg_options = None
    if args.cfg_options:
        from mmengine.config import DictAction
        p = argparse.ArgumentParser()
        p.add_argument('--o', nargs='+', action=DictAction)
        cfg_options = p.parse_args(['--o', *args.cfg_options]).o
    cfg = load_config(args.config, cfg_options)
    scope = cfg.get('default_scope', 'mmdet')
    what = args.what or export_targets(scope)[0]
    ckpt = None if args.checkpoint.lower() == 'none' else args.checkpoint
    if ckpt is None:  # trying the export: random weights throughout
        cfg.model.get('backbone', {}).pop('init_cfg', None)
    torch.manual_seed(0)
    model = init_model(cfg, ckpt, device='cpu')
    try:
        module = build_export_module(model, scope, what)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        stem = osp.splitext(osp.basename(args.config))[0]
        folder = osp.dirname(ckpt) if ckpt else '.'
        out = osp.join(folder, f'{stem}_{what}{FORMATS[args.format]}')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    shape = tuple(args.shape)
    check = tuple(args.check_shape) if args.check_shape else (
        max(32, shape[0] - 32), shape[1] + 64)

    t = time.time()
    if args.format == 'onnx':
        exporter = 'dynamo' if args.dynamo else 'torchscript'
        export_onnx(module, out, shape, args.batch, args.opset, exporter)
        how = f'torch.onnx.export ({exporter} exporter)'
    else:
        export_program(module, out, shape, args.batch)
        how = 'torch.export'
    print(f'exported the {what} of {osp.basename(args.config)} to {out} '
          f'with {how} in {time.time() - t:.1f} s: input image '
          f'({args.batch}, 3, H, W), outputs '
          f'{", ".join(module.output_names)}')

    meta = dict(config=args.config, checkpoint=ckpt, format=args.format,
                what=what, input=dict(name='image',
                                      shape=[args.batch, 3, 'H', 'W'],
                                      **preprocess_info(cfg)),
                outputs=list(module.output_names), export_shape=shape)
    status = 0
    if not args.no_check:
        rows = check_export(module, args.format, out, [shape, check],
                            args.batch)
        checker = 'ONNX Runtime' if args.format == 'onnx' else \
            'torch.export.load'
        print(f'check against PyTorch ({checker}, random images):')
        for r in rows:
            print(f'  {r["shape"][0]}x{r["shape"][1]} {r["output"]:>10}: '
                  f'max |diff| {r["max_abs_diff"]:.3g}'
                  + (f' (outputs up to {r["max_abs"]:.3g})'
                     if 'max_abs' in r else f' ({r.get("note")})'))
        worst = max(r['max_abs_diff'] for r in rows)
        ok = worst <= args.tolerance
        print(f'largest difference: {worst:.3g} '
              f'({"within" if ok else "ABOVE"} tolerance {args.tolerance:g})')
        meta['check'] = dict(shapes=[shape, check], max_abs_diff=worst,
                             tolerance=args.tolerance, passed=ok)
        status = 0 if ok else 1
    with open(osp.splitext(out)[0] + '.json', 'w') as f:
        json.dump(meta, f, indent=1)
    return status


if __name__ == '__main__':
    sys.exit(main())
