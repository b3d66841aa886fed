"""mmengine pieces for CPU-only hosts and exact resumption."""
import logging
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import HOOKS, LOOPS, MODEL_WRAPPERS, OPTIM_WRAPPERS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

__all__ = [
    'CPUDistributedDataParallel', 'CPUAmpOptimWrapper', 'RandomStateHook',
    'ExactResumeEpochBasedTrainLoop', 'ExactResumeIterBasedTrainLoop',
    'CompileBackboneHook'
]


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU processes: mmengine passes the local
    rank as a GPU id, which DDP refuses for CPU modules; and torch's
    ``SyncBatchNorm`` runs on accelerators only, so on the CPU the
    ``SyncBN`` layers of a config (Cascade's heads, say) become plain
    ``BatchNorm`` (per-process statistics), with a warning."""

    def __init__(self, module, device_ids=None, **kwargs):
        if any(isinstance(m, torch.nn.SyncBatchNorm)
               for m in module.modules()):
            from mmengine.model import revert_sync_batchnorm
            print_log('SyncBatchNorm needs an accelerator: on the CPU its '
                      'layers run as BatchNorm, each process with its own '
                      'batch statistics', logger='current',
                      level=logging.WARNING)
            module = revert_sync_batchnorm(module)
        super().__init__(module=module, device_ids=None, **kwargs)


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` (autocast + loss scaling) on the CPU.

    mmengine's class asserts an accelerator; this one builds the same
    scaler with ``torch.amp.GradScaler('cpu')`` and autocasts to bfloat16
    (mmengine's CPU autocast accepts no other dtype).
    """

    def __init__(self, loss_scale='dynamic', dtype='bfloat16', **kwargs):
        OptimWrapper.__init__(self, **kwargs)  # skip the accelerator check
        self._scale_update_param = None
        if loss_scale == 'dynamic':
            self.loss_scaler = torch.amp.GradScaler('cpu')
        elif isinstance(loss_scale, float):
            self._scale_update_param = loss_scale
            self.loss_scaler = torch.amp.GradScaler('cpu',
                                                    init_scale=loss_scale)
        elif isinstance(loss_scale, dict):
            self.loss_scaler = torch.amp.GradScaler('cpu', **loss_scale)
        else:
            raise TypeError('loss_scale must be "dynamic", a float or a dict'
                            f', got {loss_scale!r}')
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError('CPUAmpOptimWrapper: mmengine autocasts the CPU '
                             f'to bfloat16 only, got dtype={dtype!r}')
        self.cast_dtype = torch.bfloat16


# -- exact resume -------------------------------------------------------------
_RNG_ATTR = '_mmsetformer_rng_state'


def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and \
            len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the Python/NumPy/torch RNG states in every checkpoint and hand
    them to the train loop on resume, so a resumed run draws the same
    augmentations, dropout masks and samples as an uninterrupted one."""
    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['rng_state'] = _rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if runner._resume and 'rng_state' in checkpoint:
            setattr(runner, _RNG_ATTR, checkpoint['rng_state'])


@HOOKS.register_module()
class CompileBackboneHook(Hook):
    """``torch.compile`` the model's backbone before the run (train, val
    and test alike); ``compile_cfg`` goes to ``torch.compile`` (backend,
    mode, dynamic, ...).

    This is what the tools make of mmengine's ``compile`` config key:
    mmengine 0.10.7 compiles the whole ``train_step``, optimizer step
    included, which dynamo fails on with torch 2.14
    (``InternalTorchDynamoError`` in ``OptimWrapper.step``), and never the
    test step. The backbone is where the compute is, and it compiles whole.
    """
    priority = 'VERY_HIGH'

    def __init__(self, compile_cfg: Optional[dict] = None):
        self.compile_cfg = dict(compile_cfg or {})

    def before_run(self, runner) -> None:
        from mmengine.model import is_model_wrapper
        model = runner.model
        while is_model_wrapper(model) or (
                not hasattr(model, 'backbone') and hasattr(model, 'module')):
            model = model.module  # DDP, TTA model
        target = getattr(model, 'backbone', model)
        target.compile(**self.compile_cfg)
        print_log(f'torch.compile: {type(target).__name__} compiled with '
                  f'{self.compile_cfg or "default options"} (the first '
                  'iterations of each input shape and mode are slow)',
                  logger='current')


def _pop_rng_state(runner) -> Optional[dict]:
    state = getattr(runner, _RNG_ATTR, None)
    if state is not None:
        delattr(runner, _RNG_ATTR)
    return state


@LOOPS.register_module()
class ExactResumeEpochBasedTrainLoop(EpochBasedTrainLoop):
    """mmengine's epoch loop, but a run resumed from a mid-epoch checkpoint
    skips the batches of that epoch it already trained on (mmengine's loop
    restarts the epoch) and then restores the saved RNG state."""

    def run_epoch(self) -> None:
        skip = self._iter - self._epoch * len(self.dataloader)
        if skip <= 0:
            return super().run_epoch()
        print_log(f'resuming mid-epoch: skipping {skip} batches already '
                  'trained on', logger='current')
        state = _pop_rng_state(self.runner)
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        for idx, data_batch in enumerate(self.dataloader):
            if idx < skip:
                if idx == skip - 1 and state is not None:
                    _set_rng_state(state)
                continue
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


class _RestoreAfter:
    """Iterator that restores an RNG state after ``n`` items."""

    def __init__(self, iterator, n: int, state: dict):
        self.iterator, self.n, self.state = iterator, n, state

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.n -= 1
        if self.n == 0:
            _set_rng_state(self.state)
        return item


@LOOPS.register_module()
class ExactResumeIterBasedTrainLoop(IterBasedTrainLoop):
    """mmengine's iteration loop (which skips trained batches on resume),
    restoring the saved RNG state once the skipped batches are drawn."""

    def run(self):
        state = _pop_rng_state(self.runner)
        if self._iter > 0 and state is not None:
            self.dataloader_iterator = _RestoreAfter(
                self.dataloader_iterator, self._iter, state)
        return super().run()
