"""mmsetformer: SeTformer backbones for mmpretrain, mmdet, mmseg and timm.

``import mmsetformer`` registers ``SeTformer`` in the MODELS registry of each
installed OpenMMLab library and the ``setformer_{m,t,s,b}`` timm models.
"""
from . import engine  # noqa: F401  (CPU-capable mmengine wrappers)
from .checkpoint import register_safe_globals
from .models import SeTAttention, SeTformer
from .ops import set_attention, transport_plan
from .registry import register_all
from .version import __version__

register_safe_globals()
register_all()

__all__ = [
    '__version__', 'SeTformer', 'SeTAttention', 'set_attention',
    'transport_plan'
]
