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


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)
