from .set_attention import SeTAttention
from .setformer import SeTformer

__all__ = ['SeTAttention', 'SeTformer']
