"""Config preparation behind ``tools/train.py`` and ``tools/test.py``: one
pair of tools for mmdet, mmseg and mmpretrain configs alike."""
import os
import os.path as osp
from datetime import timedelta

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from . import engine  # noqa: F401  (registers the CPU wrappers)
from .data.checks import check_cfg_data

__all__ = ['add_common_args', 'parse_common', 'prepare_train_cfg',
           'prepare_test_cfg', 'close_distributed']


def add_common_args(parser) -> None:
    """The options ``tools/train.py`` and ``tools/test.py`` share."""
    parser.add_argument('--work-dir', help='where logs, metrics and '
                        'checkpoints go (default ./work_dirs/<config>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. '
        'train_dataloader.batch_size=4 model.backbone.init_cfg=None)')
    parser.add_argument('--skip-data-check', action='store_true',
                        help='do not check the dataset files before start')
    parser.add_argument(
        '--compile', action='store_true',
        help='torch.compile the backbone (sets the config key `compile`; '
        'torch.compile options with --cfg-options compile.backend=... '
        'compile.mode=...)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm',
                                               'mpi'], default='none')
    # torch.distributed.launch passes --local-rank (torchrun sets the env)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_common(parser):
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def _common(cfg: Config, args) -> Config:
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.compile and not cfg.get('compile'):
        cfg.compile = True
    _compile_hook(cfg)
    # work_dir: CLI > config > ./work_dirs/<config name>
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.launcher != 'none' and not torch.cuda.is_available():
        _init_cpu_distributed(cfg, args.launcher)
    return cfg


def _init_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Distributed runs on CPU-only hosts.

    NCCL needs GPUs, so the backend becomes gloo; and mmengine's launcher
    calls ``torch.cuda.set_device``, which fails without a GPU, so the
    process group is initialised here (mmengine then skips its own init).
    """
    import torch.distributed as dist
    env = cfg.setdefault('env_cfg', ConfigDict())
    dist_cfg = env.setdefault('dist_cfg', ConfigDict())
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
        print_log('no CUDA device: distributed backend set to gloo',
                  logger='current')
    if launcher != 'pytorch':
        raise RuntimeError(f'--launcher {launcher} needs GPUs here; on CPUs '
                           'launch with torchrun (tools/dist_train.sh)')
    # mmengine hands DDP the local rank as a GPU id; CPU modules need none.
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    if wrapper.get('type', 'MMDistributedDataParallel') == \
            'MMDistributedDataParallel':
        wrapper['type'] = 'CPUDistributedDataParallel'
    cfg.model_wrapper_cfg = wrapper
    if not dist.is_initialized():
        timeout = dist_cfg.get('timeout', 1800)
        dist.init_process_group(backend=dist_cfg['backend'],
                                timeout=timedelta(seconds=timeout))


def close_distributed() -> None:
    """Destroy the process group once a run has ended normally.

    A process that exits with the group alive leaves gloo's worker threads
    holding work (and tensors) while the interpreter shuts down; a rank then
    aborts now and then ("terminate called without an active exception",
    SIGABRT) and torchrun fails a finished run.  Destroying the group is not
    enough while the DDP wrapper still holds it: callers drop their Runner
    first, the garbage collector frees its cycles (model, reducer, their
    pending work) here, and all ranks meet before the group goes.  Not called
    when the run raised: destroying it while other ranks wait in a
    collective can hang.
    """
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def _compile_hook(cfg: Config) -> None:
    """mmengine's ``compile`` key (``True`` or torch.compile options)
    becomes a :class:`CompileBackboneHook`: mmengine itself would compile
    the whole train step, optimizer included, which fails (see the hook)."""
    compile_cfg = cfg.pop('compile', None)
    if not compile_cfg:
        return
    if compile_cfg is True:
        compile_cfg = {}
    if not isinstance(compile_cfg, dict):
        raise TypeError('compile must be True or a dict of torch.compile '
                        f'options, got {compile_cfg!r}')
    hooks = list(cfg.get('custom_hooks') or [])
    hooks.append(dict(type='CompileBackboneHook',
                      compile_cfg=dict(compile_cfg)))
    cfg.custom_hooks = hooks


_EXACT_LOOPS = {
    'EpochBasedTrainLoop': 'ExactResumeEpochBasedTrainLoop',
    'IterBasedTrainLoop': 'ExactResumeIterBasedTrainLoop',
}


def _exact_resume(cfg: Config) -> None:
    """Checkpoints carry the RNG state and resumed runs skip what they
    already trained on, so a killed run continues exactly where it was."""
    loop = cfg.get('train_cfg') or {}
    kind = loop.get('type', 'EpochBasedTrainLoop' if loop.get(
        'by_epoch', 'max_epochs' in loop) else 'IterBasedTrainLoop')
    if kind in _EXACT_LOOPS:
        loop.pop('by_epoch', None)
        loop['type'] = _EXACT_LOOPS[kind]
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(h.get('type') == 'RandomStateHook' for h in hooks):
        hooks.append(dict(type='RandomStateHook'))
    cfg.custom_hooks = hooks


def prepare_train_cfg(cfg: Config, args) -> Config:
    cfg = _common(cfg, args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper' and \
            not torch.cuda.is_available():
        # mmengine's AMP wrapper needs a GPU; bf16 autocast on the CPU
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        print_log('no CUDA device: AMP runs as bfloat16 autocast on the CPU '
                  '(CPUAmpOptimWrapper)', logger='current')
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.'
                               'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume: no checkpoint {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    _exact_resume(cfg)
    if args.no_validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if not args.skip_data_check:
        check_cfg_data(cfg, ('train', 'val'))
    return cfg


def _enable_visualization(cfg: Config, scope: str, out_dir: str) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise KeyError('--show-dir needs default_hooks.visualization')
    if scope == 'mmdet':
        hook.update(draw=True, test_out_dir=out_dir)
    elif scope == 'mmseg':
        hook.update(draw=True, interval=1)  # every image, not every 50th
        cfg.visualizer['save_dir'] = out_dir
    else:  # mmpretrain
        hook.update(enable=True, out_dir=out_dir, interval=1)


def prepare_test_cfg(cfg: Config, args) -> Config:
    cfg = _common(cfg, args)
    scope = cfg.get('default_scope', 'mmdet')
    cfg.load_from = args.checkpoint
    # the trained weights replace the backbone's pretrained init
    backbone = cfg.model.get('backbone')
    if backbone is not None:
        backbone.pop('init_cfg', None)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise KeyError(f'{args.config} defines no tta_model / '
                           'tta_pipeline for --tta')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out:
        dump = dict(type='DumpDetResults' if scope == 'mmdet' else
                    'DumpResults', out_file_path=args.out)
        evaluators = cfg.test_evaluator
        cfg.test_evaluator = (list(evaluators) if isinstance(
            evaluators, (list, tuple)) else [evaluators]) + [dump]
    if args.show_dir:
        _enable_visualization(cfg, scope, args.show_dir)
    if not args.skip_data_check:
        check_cfg_data(cfg, ('test', ))
    return cfg
