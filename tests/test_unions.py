"""Every backend on unions of parts against the float64 reference, forward and backward (issue 27):
random unions of up to three parts at N in {1, 63, 64, 100, 257}."""

import pytest
import torch

import sparse_transformer as st
from parts_cases import LENGTHS, random_unions
from sparse_transformer.attention import BACKENDS
from tolerances import assert_close

P = st.patterns
UNIONS = random_unions(seed=7, count=10)
NAMED = [P.local(6) | P.column(4), P.block(8) | P.summary(6, 2, 2), P.local(7) | P.block(12) | P.summary(8, 2),
         P.column(3) | P.column(5) | P.block(4), P.summary(8, 2, 2) | P.summary(6, 3), P.local(20) | P.column(7)]


def qkv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


def against_reference(backend, pattern, shape, dtype, compare, seed=0):
    q, k, v = qkv(shape, dtype, seed)
    out = BACKENDS[backend].load()(q, k, v, pattern, shape[-1] ** -0.5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = BACKENDS["reference"].load()(q64, k64, v64, pattern, shape[-1] ** -0.5)
    ref.backward(grad.double())
    compare(out, ref, dtype)
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        compare(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("pattern", UNIONS + NAMED, ids=str)
def test_torch_backend_on_unions(pattern):
    for n in LENGTHS:
        against_reference("torch", pattern, (1, 3, n, 8), torch.float32, assert_close, seed=n)


@pytest.mark.parametrize("pattern", NAMED[:3], ids=str)
def test_torch_backend_gradcheck_on_unions(pattern):
    q, k, v = (x.detach().requires_grad_() for x in qkv((1, 2, 19, 4), torch.float64, 3))
    assert torch.autograd.gradcheck(lambda a, b, c: st.sparse_attention(a, b, c, pattern, backend="torch"), (q, k, v))


def test_overlapping_parts_count_each_key_once():
    """Two parts that admit the same keys give the softmax over the set, not the multiset: equal to
    one custom pattern with the same mask."""
    pattern = P.local(9) | P.column(3)  # j = i - 3, i - 6 in both
    same = P.custom(lambda b, h, q, k: (q - k < 9) | ((q - k) % 3 == 0), per_head=False)
    q, k, v = qkv((1, 2, 50, 8), torch.float64, 5)
    assert_close(st.sparse_attention(q, k, v, pattern, backend="torch"),
                 st.sparse_attention(q, k, v, same, backend="torch"))
