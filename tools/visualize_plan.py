"""Draw the SeT transport plan of one layer over an image: which image
regions each reference cell gathers (the paper's Figure 4 view).

    python tools/visualize_plan.py CONFIG CHECKPOINT IMAGE --out plan.png
    python tools/visualize_plan.py configs/upernet_setformer_t_160k.py \
        ckpt.pth demo.jpg --stage 1 --block -1 --head 0 --size 512 512

Works with any SeTformer config (classification, detection, segmentation).
"""
import argparse
import os
import os.path as osp
import sys

import cv2

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmsetformer.apis import init_model  # noqa: E402
from mmsetformer.visualization import (find_backbone, image_tensor,  # noqa
                                       layer_plan, plot_plan)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint', nargs='?', default=None,
                   help='trained weights (omit for the untrained model)')
    p.add_argument('image')
    p.add_argument('--out', default='transport_plan.png')
    p.add_argument('--stage', type=int, default=1, help='stage 0-3')
    p.add_argument('--block', type=int, default=-1, help='block in stage')
    p.add_argument('--head', type=int, default=None,
                   help='one head (default: mean over heads)')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                   help='resize the image first (default: as is)')
    p.add_argument('--num-show', type=int, default=8,
                   help='cells to draw, the most focused first')
    args = p.parse_args()

    img = cv2.imread(args.image)
    if img is None:
        raise FileNotFoundError(f'cannot read image {args.image}')
    if args.size:
        img = cv2.resize(img, (args.size[1], args.size[0]),
                         interpolation=cv2.INTER_LINEAR)
    model = init_model(args.config, args.checkpoint)
    backbone = find_backbone(model)
    x = image_tensor(img, model.cfg.model.get('data_preprocessor') or
                     model.cfg.get('data_preprocessor'))
    plan, hw, grid = layer_plan(backbone, x, args.stage, args.block)
    block = args.block % len(backbone.stages[args.stage].blocks)
    head = 'mean of heads' if args.head is None else f'head {args.head}'
    title = (f'{osp.basename(args.config)}: stage {args.stage}, block '
             f'{block}, {head}')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    print(plot_plan(img, plan, hw, grid, args.out, title, args.head,
                    args.num_show))


if __name__ == '__main__':
    main()
