"""mmsetformer: SeTformer backbones for mmpretrain, mmdet, mmseg and timm.

``import mmsetformer`` registers ``SeTformer`` in the MODELS registry of each
installed OpenMMLab library and the ``setformer_{m,t,s,b}`` timm models.
"""
from .compat import mmpretrain_without_broken_multimodal

mmpretrain_without_broken_multimodal()  # before anything imports mmpretrain
from . import engine  # noqa: E402,F401  (CPU-capable mmengine wrappers)
from .checkpoint import register_safe_globals  # noqa: E402
from .models import SeTAttention, SeTformer  # noqa: E402
from .ops import set_attention, transport_plan  # noqa: E402
from .registry import register_all  # noqa: E402
from .version import __version__  # noqa: E402

register_safe_globals()
register_all()

__all__ = [
    '__version__', 'SeTformer', 'SeTAttention', 'set_attention',
    'transport_plan'
]
