"""longattn: attention over long contexts behind one PyTorch API.

>>> import torch, longattn
>>> q = torch.randn(1, 8, 1024, 64); k = v = torch.randn(1, 2, 1024, 64)
>>> out = longattn.attention(q, k, v, method="moba", block_size=128, top_k=3)
"""

from .api import attention
from .registry import get_method, list_methods
from .selection import BlockSelection

__version__ = "0.1.0"

__all__ = ["attention", "get_method", "list_methods", "BlockSelection", "__version__"]
