"""Train any mmsetformer config (mmdet, mmseg or mmpretrain, chosen by the
config's ``default_scope``) with mmengine's Runner.

    python tools/train.py configs/mask_rcnn_setformer_t_3x.py
    tools/dist_train.sh configs/mask_rcnn_setformer_t_3x.py 8
    python tools/train.py CONFIG --resume            # latest in work_dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_2000.pth
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmsetformer.runner import prepare_train_cfg  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description='Train a SeTformer model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where to save logs and models')
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
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. '
        'train_dataloader.batch_size=4 model.backbone.init_cfg=None)')
    parser.add_argument('--skip-data-check', action='store_true',
                        help='do not check the dataset files before start')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm',
                                               'mpi'], default='none')
    # torch.distributed.launch passes --local-rank (torchrun sets the env)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    cfg = prepare_train_cfg(cfg, args)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
