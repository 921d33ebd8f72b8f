"""sparse-transformer: OpenAI's Sparse Transformer (Child et al. 2019) for today's GPUs.

Public API::

    import sparse_transformer as st
    pattern = st.patterns.fixed(stride=128, summary=32)
    out = st.sparse_attention(q, k, v, pattern)        # q, k, v: [B, H, N, D]
    model = st.SparseTransformer(st.presets.get("tiny").model)
"""

from . import config, layout, patterns, presets
from .attention import sparse_attention
from .model import SparseTransformer

__version__ = "0.1.0"

__all__ = ["patterns", "layout", "sparse_attention", "SparseTransformer", "config", "presets", "__version__"]
