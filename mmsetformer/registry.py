"""Thin registrations of the one SeTformer definition in each library."""
import importlib
from typing import List

from .models import SeTformer

__all__ = ['register_all', 'REGISTERED']

# Libraries whose MODELS registry received SeTformer.
REGISTERED: List[str] = []

_MM_LIBS = ('mmpretrain', 'mmdet', 'mmseg')


def register_all() -> List[str]:
    """Register ``SeTformer`` in every installed mm library and in timm.

    A library that is not installed is skipped; one that is installed but
    broken raises, so the problem is not hidden.
    """
    for lib in _MM_LIBS:
        if lib in REGISTERED:
            continue
        try:
            registry = importlib.import_module(f'{lib}.registry')
        except ModuleNotFoundError as e:
            if e.name and e.name.split('.')[0] == lib:
                continue
            raise
        registry.MODELS.register_module('SeTformer', module=SeTformer,
                                        force=True)
        REGISTERED.append(lib)
    if 'timm' not in REGISTERED:
        try:
            importlib.import_module('timm')
        except ModuleNotFoundError:
            return REGISTERED
        importlib.import_module('mmsetformer.timm_models')
        REGISTERED.append('timm')
    return REGISTERED
