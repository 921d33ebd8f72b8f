"""sparse-transformer: OpenAI's Sparse Transformer (Child et al. 2019) for today's GPUs.

Public API::

    import sparse_transformer as st
    pattern = st.patterns.fixed(stride=128, summary=32)
    out = st.sparse_attention(q, k, v, pattern)        # q, k, v: [B, H, N, D]
"""

from . import layout, patterns
from .attention import sparse_attention

__version__ = "0.1.0"

__all__ = ["patterns", "layout", "sparse_attention", "__version__"]
