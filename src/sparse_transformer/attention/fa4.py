"""The ``fa4`` backend: the fixed pattern on FlashAttention-4's Hopper kernels (optional:
``pip install sparse-transformer[fa4]``, which brings ``flash-attn-4`` and ``nvidia-cutlass-dsl``).

FlashAttention-4 runs block-sparse attention: per query tile, the key tiles to compute in full and
those to compute under a mask function written in CuTe. Here the keys are the concatenated layout
(:mod:`.concatenated`: the sequence, then each head's summary slots), the tiles are its BlockMask's
(forward: key tiles per query tile; backward: query tiles per key tile), and the mask is
:func:`gathered_fixed_mask`, a closed form the kernel evaluates without a position table. One
softmax, so FlashAttention-4's backward (which takes no gradient of the log-sum-exp) is exact.

``auto`` picks it only where it was measured faster than ``triton`` (:func:`auto_picks`), and
never inside ``torch.compile``: its CuTe launch is not traceable.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ..patterns import Pattern
from .concatenated import concatenated_keys

# The shapes where fa4 was measured faster than triton (docs/results.md, issue 28, "the crossover"):
# FlashAttention-4 pays a fixed cost per call that only long sequences repay.
AUTO_MIN_TOKENS = 32768
AUTO_STRIDE = 128
AUTO_SUMMARY = 32  # at summary 16 triton was faster (fixed 128/16 at 32,768)
AUTO_HEAD_WIDTH = 64

INSTALL = "pip install sparse-transformer[fa4] (flash-attn-4 with nvidia-cutlass-dsl; a Hopper or newer GPU)"


def available() -> bool:
    """Whether FlashAttention-4's CuTe interface can be imported."""
    return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None


def version() -> Optional[str]:
    """The installed ``flash-attn-4`` version (None: not installed, or installed without its metadata)."""
    import importlib.metadata

    if not available():
        return None
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def fixed_sizes(pattern: Pattern) -> tuple[int, int]:
    """``(stride, summary)`` of a fixed pattern (a block part then a summary part of the same
    stride), the only patterns this backend runs; else ValueError."""
    tokens = [p.token for p in pattern.parts]
    if tokens != ["block", "summary"] or pattern.parts[0].size != pattern.parts[1].stride:
        raise ValueError(f"the fa4 backend runs the fixed pattern (block(l) | summary(l, c)), got {pattern}")
    return pattern.parts[1].stride, pattern.parts[1].summary


def is_fixed(pattern: Pattern) -> bool:
    """Whether :func:`fixed_sizes` takes ``pattern``."""
    try:
        fixed_sizes(pattern)
    except ValueError:
        return False
    return True


def gathered_fixed_mask(q_idx, kv_idx, n, stride, summary):
    """The fixed pattern over ``[sequence keys | summary slots]``: a sequence key of the query's own
    block at or before it, or summary slot ``g = kv_idx - n``, which belongs to block ``g //
    summary``, of an earlier block (the block part already holds the query's own block). Operators
    only, so the same rule runs on torch tensors (tests) and on CuTe values (the kernel's mask)."""
    own_block = (kv_idx < n) & (kv_idx // stride == q_idx // stride) & (kv_idx <= q_idx)
    earlier_summary = (kv_idx >= n) & ((kv_idx - n) // summary < q_idx // stride)
    return own_block | earlier_summary


@functools.lru_cache(maxsize=32)
def _cute_mask(n: int, stride: int, summary: int):
    """:func:`gathered_fixed_mask` as a CuTe mask function; its sizes are compile-time constants
    (FlashAttention-4 keys its compiled kernels by the function's source and captured values)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        return gathered_fixed_mask(q_idx, kv_idx, scalar_to_ssa(n, cutlass.Int32), scalar_to_ssa(stride, cutlass.Int32),
                                   scalar_to_ssa(summary, cutlass.Int32))

    return mask_mod


def fa4_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """The fixed pattern through ``flash_attn_func``, q, k, v ``[B, H, N, D]``: the gathered keys, the block mask's tiles as
    its block-sparse tensors (forward: key tiles per query tile; backward: query tiles per key tile)
    and :func:`gathered_fixed_mask`. The gather is part of the call (and of its backward)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    stride, summary = fixed_sizes(pattern)
    keys, values, block = concatenated_keys(q, k, v, pattern)
    size = block.BLOCK_SIZE
    forward = BlockSparseTensorsTorch(block.kv_num_blocks, block.kv_indices, block.full_kv_num_blocks,
                                      block.full_kv_indices, block_size=size)
    backward = BlockSparseTensorsTorch(block.q_num_blocks, block.q_indices, block.full_q_num_blocks,
                                       block.full_q_indices, block_size=size)
    out, _ = flash_attn_func(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), softmax_scale=scale,
                             mask_mod=_cute_mask(q.shape[2], stride, summary), block_sparse_tensors=forward,
                             block_sparse_tensors_bwd=backward)
    return out.transpose(1, 2)


def supports(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    """CUDA of compute capability 9 or more with flash-attn-4 installed, fp16/bf16, q, k and v of one
    head width in (64, 128), and a fixed pattern (any summary width and distinct count)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1] in (64, 128)):
        return False
    return is_fixed(pattern) and torch.cuda.get_device_capability(q.device)[0] >= 9 and available()


def auto_picks(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    """Whether ``backend="auto"`` takes fa4: where :func:`supports` holds, on the shapes where it was
    measured faster than ``triton`` (stride :data:`AUTO_STRIDE`, summary width :data:`AUTO_SUMMARY`
    (any distinct count), head width :data:`AUTO_HEAD_WIDTH`, at least :data:`AUTO_MIN_TOKENS` tokens),
    and not while ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or q.shape[-1] != AUTO_HEAD_WIDTH or q.shape[-2] < AUTO_MIN_TOKENS:
        return False
    return supports(q, v, pattern) and fixed_sizes(pattern) == (AUTO_STRIDE, AUTO_SUMMARY)
