"""A NaN or inf in a value row reaches only the queries that may attend it (issue 26), on every
backend that runs on the CPU: reference, torch, flex (eager) and triton (interpreter)."""

import importlib.util
import os

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.attention import BACKENDS

P = st.patterns
N = 129  # the case: a NaN in v[100] turned all 100 earlier queries into NaN (dense)
PATTERNS = [P.dense(), P.strided(8), P.fixed(16, 4, 2), P.local(5) | P.column(16) | P.summary(32, 4),
            P.custom(lambda b, h, q, k: (q - k) % 3 == 0, "every_third", per_head=False)]


# The Triton kernels multiply a masked pair's probability 0 by its value inside the tile's matmul, so
# a non-finite value still reaches the other queries of its 64-row tile. Guarding every tile that
# masks pairs took 40 to 60 more registers in the forward and dQ kernels compiled for sm_90
# (benchmarks/kernel_resources.py: strided forward 122 -> 180), too slow to keep: known, not fixed.
TRITON_LEAKS = pytest.mark.xfail(strict=True, reason="a non-finite value reaches its tile's other queries")


def backends():
    names = ["reference", "torch", "flex"]
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        names.append(pytest.param("triton", marks=TRITON_LEAKS))
    return names


def inputs(dtype, bad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g).to(dtype) for _ in range(3))
    v[0, 1, 100, 3] = bad  # head 1 only, one coordinate
    v[0, 0, 60, :] = bad  # head 0: a whole row
    return q, k, v


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_masked_value_rows_contribute_nothing(backend, pattern):
    if backend == "triton" and not pattern.parts:
        pytest.skip("triton runs built-in patterns only")
    dtype = torch.float16 if backend == "triton" else torch.float32
    for bad in (float("nan"), float("inf")):
        q, k, v = inputs(dtype, bad)
        out = BACKENDS[backend].load()(q, k, v, pattern, 0.25).float()  # flex: eager on the CPU
        for head, key, columns in ((1, 100, [3]), (0, 60, list(range(16)))):
            sees = pattern.mask(N, head=head)[:, key]
            others = [c for c in range(16) if c not in columns]
            assert torch.isfinite(out[0, head][~sees]).all(), f"a query that cannot attend key {key} is not finite"
            hit = out[0, head][sees][:, columns]
            assert torch.isfinite(out[0, head][:, others]).all(), "a finite coordinate became non-finite"
            assert (hit.isnan() if bad != bad else hit == float("inf")).all(), "an attended bad value was lost"
        assert torch.isfinite(out[0, :, :60]).all() or pattern.spec is None


@pytest.mark.parametrize("backend", [b for b in backends() if b != "flex"])  # flex: no CPU backward
@pytest.mark.parametrize("pattern", [P.strided(8), P.local(7) | P.column(16) | P.summary(32, 4)], ids=str)
def test_gradients_of_queries_that_cannot_attend_stay_finite(backend, pattern):
    dtype = torch.float16 if backend == "triton" else torch.float64
    q, k, v = (x.requires_grad_() for x in inputs(dtype, float("nan")))
    out = BACKENDS[backend].load()(q, k, v, pattern, 0.25)
    sees = pattern.mask(N, head=1)[:, 100] | pattern.mask(N, head=0)[:, 60]
    out[0, :, ~sees].float().sum().backward()
    assert torch.isfinite(q.grad[0, :, ~sees]).all()  # their dq
    assert torch.isfinite(v.grad).all()


def test_mixed_infinities_give_nan():
    q, k, v = inputs(torch.float64, float("inf"))  # +inf at key 100
    v[0, 1, 90, 3] = float("-inf")
    out = st.sparse_attention(q, k, v, P.dense(), backend="torch")
    assert out[0, 1, 95, 3] == float("-inf") and torch.isnan(out[0, 1, 100:, 3]).all()
