"""Evaluate a checkpoint of any mmsetformer config with its metrics
(COCO box/mask AP, ADE20K mIoU, ImageNet top-1/top-5).

    python tools/test.py configs/mask_rcnn_setformer_t_3x.py CKPT
    python tools/test.py configs/upernet_setformer_t_160k.py CKPT --tta  # MS
    tools/dist_test.sh configs/upernet_setformer_t_160k.py CKPT 8
    python tools/test.py CONFIG CKPT --compile   # torch.compile the model
"""
import argparse
import json
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmsetformer.runner import (add_common_args, close_distributed,  # noqa
                                parse_common, prepare_test_cfg)


def parse_args():
    parser = argparse.ArgumentParser(description='Test a SeTformer model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='dump the raw predictions (pickle)')
    parser.add_argument('--show-dir', help='draw predictions into this dir')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation (the config's "
                        'tta_pipeline: multi-scale + flip for ADE20K)')
    parser.add_argument('--metrics-json',
                        help='also write the final metrics to this file')
    add_common_args(parser)
    return parse_common(parser)


def _jsonable(v):
    # numpy scalars and arrays in metric dicts
    return v.tolist() if hasattr(v, 'tolist') else str(v)


def main():
    args = parse_args()
    cfg = prepare_test_cfg(Config.fromfile(args.config), args)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    metrics = runner.test()
    rank = runner.rank
    del runner  # its DDP wrapper holds the process group
    close_distributed()
    if args.metrics_json and rank == 0:
        with open(args.metrics_json, 'w') as f:
            json.dump(metrics, f, indent=1, default=_jsonable)


if __name__ == '__main__':
    main()
