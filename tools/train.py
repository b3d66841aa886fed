"""Train any mmsetformer config (mmdet, mmseg or mmpretrain, chosen by the
config's ``default_scope``) with mmengine's Runner.

    python tools/train.py configs/mask_rcnn_setformer_t_3x.py
    tools/dist_train.sh configs/mask_rcnn_setformer_t_3x.py 8
    python tools/train.py CONFIG --resume            # latest in work_dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_2000.pth
    python tools/train.py CONFIG --compile   # torch.compile the train step
"""
import argparse
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmsetformer.runner import (add_common_args, close_distributed,  # noqa
                                parse_common, prepare_train_cfg)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a SeTformer model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr with the real batch size (the '
                        'configs of this project already enable it)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from a checkpoint; without a path, from the latest '
        'checkpoint in the work dir')
    parser.add_argument('--no-validate', action='store_true',
                        help='skip validation during training')
    add_common_args(parser)
    return parse_common(parser)


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    cfg = prepare_train_cfg(cfg, args)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    runner.train()
    del runner  # its DDP wrapper holds the process group
    close_distributed()


if __name__ == '__main__':
    main()
