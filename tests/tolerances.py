"""Tolerances for comparing a backend with the float64 reference, in one place.

(atol, rtol) per dtype: fp32 arithmetic lands near 1e-6; bf16/fp16 inputs carry 8/11-bit mantissas.
"""

import torch

TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


# A gradient that is exactly zero in exact arithmetic (N = 1: one key, so dq = dk = 0) is compared by
# its largest element, not by a relative error against a reference of norm ~1e-17.
ZERO_ATOL = 1e-6


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# Flash-style GPU kernels round the probabilities P and the score gradients dS to the input dtype
# before each tensor-core matmul (as FlashAttention does), so single elements can drift by a few
# input-dtype ulps of the largest term. They are compared the METHOD.md way instead: relative
# Frobenius error ||x - ref|| / ||ref|| <= 4 unit roundoffs of the input dtype (u = 2^-8 bf16, 2^-11 fp16).
KERNEL_REL_NORM = {
    torch.float16: 4 * 2.0 ** -11,
    torch.bfloat16: 4 * 2.0 ** -8,
    torch.float32: 1e-4,
}


def assert_close_norm(actual, expected, dtype):
    """Relative Frobenius error within KERNEL_REL_NORM[dtype]; NaN never passes. A reference that is
    zero up to roundoff (N = 1: dq = dk = 0) is compared by ZERO_ATOL instead."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(actual).all(), "non-finite values"
    if expected.norm() < 1e-9:
        assert actual.abs().max() <= ZERO_ATOL, f"{actual.abs().max():.3g} where the reference is 0"
        return
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= KERNEL_REL_NORM[dtype], f"relative error {err:.3g} > {KERNEL_REL_NORM[dtype]:.3g} for {dtype}"