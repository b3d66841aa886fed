"""Write the embedded shapes dataset (COCO + ADE20K-style + ImageNet-style).

    python tools/make_shapes_dataset.py data/shapes
    python tools/make_shapes_dataset.py data/tiny --num-train 8 --num-val 4 \
        --size 96 128 --seed 1

Deterministic: the same arguments write the same files. See
mmsetformer/data/shapes.py for the layout.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmsetformer.data.shapes import generate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('out_dir')
    p.add_argument('--num-train', type=int, default=200)
    p.add_argument('--num-val', type=int, default=50)
    p.add_argument('--size', type=int, nargs=2, default=(128, 160),
                   metavar=('H', 'W'))
    p.add_argument('--cls-per-class', type=int, nargs=2, default=(30, 10),
                   metavar=('TRAIN', 'VAL'),
                   help='single-shape classification images per class')
    p.add_argument('--cls-size', type=int, default=64)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    generate(args.out_dir, args.num_train, args.num_val, tuple(args.size),
             tuple(args.cls_per_class), args.cls_size, args.seed)
    print(f'shapes dataset written to {args.out_dir} in '
          f'{time.time() - t0:.1f}s')


if __name__ == '__main__':
    main()
