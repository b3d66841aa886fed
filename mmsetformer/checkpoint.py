"""Safe checkpoint loading for SeTformer weights.

Every load goes through ``torch.load(weights_only=True)``: a file that would
need arbitrary Python objects (and could run code while unpickling) is
refused, never retried unsafely.  The few plain-data classes that mmengine
writes into training checkpoints are allow-listed so resuming works under
torch's ``weights_only`` default.
"""
import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn

__all__ = [
    'safe_load', 'load_pretrained', 'select_weights', 'checkpoint_filter_fn',
    'register_safe_globals', 'UnsafeCheckpointError'
]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that ``weights_only`` loading refuses."""


def register_safe_globals() -> None:
    """Allow-list the plain-data objects mmengine puts in checkpoints.

    mmengine's MessageHub stores ``HistoryBuffer`` objects (numpy arrays and
    ints) and dataset metadata may hold numpy scalars.  None of these runs
    code when rebuilt, so allowing them keeps torch's safe loader on.
    """
    import numpy as np
    safe = [np.ndarray, np.dtype]
    try:
        safe.append(np._core.multiarray._reconstruct)
        safe.append(np._core.multiarray.scalar)
    except AttributeError:  # numpy < 2
        safe.append(np.core.multiarray._reconstruct)
        safe.append(np.core.multiarray.scalar)
    # numpy >= 1.25 pickles dtypes by their class (e.g. Float64DType).
    safe += list({type(np.dtype(t)) for t in np.sctypeDict.values()})
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        HistoryBuffer = None
    if HistoryBuffer is not None:
        safe.append(HistoryBuffer)
        # mmengine pickles the buffer's statistic *functions* (rebuilt via
        # builtins.getattr, which a safe loader must never allow); they are
        # class-level and re-registered on load, so leave them out.
        HistoryBuffer.__getstate__ = _history_buffer_state
    torch.serialization.add_safe_globals(safe)
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return
    # every local load of mmengine (load_from, resume, Pretrained init)
    # goes through the same safe loader and its clear errors
    CheckpointLoader.register_scheme(
        prefixes='', loader=lambda f, map_location: safe_load(
            os.path.expanduser(f), map_location), force=True)


def _history_buffer_state(self) -> dict:
    state = dict(self.__dict__)
    state.pop('statistics_methods', None)
    return state


def safe_load(path: str, map_location='cpu'):
    """``torch.load`` with ``weights_only=True`` and clear errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'checkpoint not found: {path!r}. Train or download it first and '
            'point the config variable `pretrained = ...` at it, or train '
            'from scratch with --cfg-options model.backbone.init_cfg=None')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f'refusing to load {path!r}: it contains Python objects that are '
            'not plain tensors/containers, and unpickling them could execute '
            f'code. Re-save its state_dict only if you trust it. ({e})'
        ) from None


def _unwrap(ckpt) -> Dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict):
        raise TypeError(f'a checkpoint must be a dict, got {type(ckpt)}')
    for key in ('state_dict', 'model', 'state_dict_ema', 'module'):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def select_weights(ckpt, prefix: Optional[str] = None) -> Dict:
    """The state dict of ``ckpt`` (any format the project writes: mmengine
    runner checkpoint, plain state dict, DDP ``module.`` keys), restricted to
    the keys under ``prefix`` (e.g. ``'backbone.'``) with it removed."""
    out = OrderedDict()
    for k, v in _unwrap(ckpt).items():
        if k.startswith('module.'):
            k = k[len('module.'):]
        if prefix:
            if not k.startswith(prefix):
                continue
            k = k[len(prefix):]
        out[k] = v
    return out


# the backbone's per-stage output norms (not the blocks' norm1/norm2)
_OUT_NORM = re.compile(r'^backbone\.norm\d+\.(weight|bias)$')


def checkpoint_filter_fn(state_dict, model: nn.Module) -> Dict:
    """timm's filter: map a SeTformer checkpoint onto ``model``'s keys.

    Output norms are per stage, and a model owns those of the stages it
    returns: a classifier checkpoint has the last stage's only, the others
    (used by ``features_only``) keep ``model``'s initial values; the norms
    of a detector's or segmentor's backbone that ``model`` does not have
    are dropped. So the strict load of ``timm.create_model(pretrained=True)``
    succeeds either way.
    """
    out = select_weights(state_dict)
    own = model.state_dict()
    for k in [k for k in out if _OUT_NORM.search(k) and k not in own]:
        del out[k]
    for k, v in own.items():
        if k not in out and _OUT_NORM.search(k):
            out[k] = v
    return out


def load_pretrained(module: nn.Module,
                    path: str,
                    prefix: Optional[str] = None,
                    map_location='cpu',
                    logger='current') -> nn.Module:
    """Load weights safely into ``module`` and report what did not match.

    With ``prefix=None``, a file whose keys do not name ``module``'s but
    lie under ``backbone.`` (a whole classifier, detector or segmentor)
    loads its backbone.
    """
    from mmengine.logging import print_log
    ckpt = safe_load(path, map_location)
    state_dict = select_weights(ckpt, prefix)
    if prefix is None and not set(state_dict) & set(module.state_dict()) \
            and any(k.startswith('backbone.') for k in state_dict):
        # a whole classifier / detector / segmentor named without a prefix
        # (mmseg's and mmdet's `pretrained=`): its backbone is meant
        prefix = 'backbone.'
        state_dict = select_weights(ckpt, prefix)
    if prefix and not state_dict:
        raise KeyError(f'no key of {path!r} starts with prefix {prefix!r}')
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    name = type(module).__name__
    print_log(
        f'{name}: loaded {len(state_dict) - len(unexpected)} tensors from '
        f'{path}' + (f' (prefix {prefix!r})' if prefix else ''),
        logger=logger)
    if missing:
        print_log(f'{name}: {len(missing)} missing keys (left as '
                  f'initialised): {", ".join(missing)}', logger=logger,
                  level=30)
    if unexpected:
        print_log(f'{name}: {len(unexpected)} unexpected keys (ignored): '
                  f'{", ".join(unexpected)}', logger=logger, level=30)
    return module
