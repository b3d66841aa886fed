"""Test instrumentation: record the global (all-reduced over ranks) training
loss of every step, so runs with different process counts can be compared
step by step. Imported by test configs through ``custom_imports``."""
import json

import torch
from mmengine.dist import all_reduce, get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class GlobalLossRecorder(Hook):

    def __init__(self, out: str):
        self.out = out

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        loss = outputs['loss'].detach().clone().float()
        all_reduce(loss, op='mean')
        if get_rank() == 0:
            with open(self.out, 'a') as f:
                f.write(json.dumps(dict(step=runner.iter + 1,
                                        loss=loss.item())) + '\n')


def read(path):
    with open(path) as f:
        return {r['step']: r['loss'] for r in map(json.loads, f)}


__all__ = ['GlobalLossRecorder', 'read', 'torch']
