"""Backends against the float64 reference: outputs and gradients (issue: core)."""

import subprocess
import sys

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.attention import BACKENDS, choose_backend
from tolerances import assert_close

P = st.patterns

PATTERNS = [
    P.dense(),
    P.strided(4), P.strided(4, "row"), P.strided(4, "column"),
    P.strided(1), P.strided(100),  # stride 1 and stride > N
    P.fixed(4, 2), P.fixed(8, 2, distinct=3), P.fixed(8, 2, distinct=3, part="summary"),
    P.fixed(5, 1, part="local"), P.fixed(4, 4), P.fixed(64, 16, distinct=2),  # summary == stride; stride > N
    P.custom(lambda b, h, q, k: (q - k) % 3 == 0, "every_third", per_head=False),
    P.custom(lambda b, h, q, k: k % 4 == h % 4, "per_head_columns"),
]
LENGTHS = [1, 7, 33]  # 33: not a multiple of any stride above


def qkv(shape, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_forward_backward(pattern, n, dtype):
    q, k, v = qkv((2, 4, n, 16), dtype, seed=n, requires_grad=True)
    out = st.sparse_attention(q, k, v, pattern, backend="torch")
    assert out.dtype == dtype and out.shape == q.shape
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = st.sparse_attention(q64, k64, v64, pattern, backend="reference")
    ref.backward(grad.double())
    assert_close(out, ref, dtype)
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        assert_close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("pattern", [P.strided(3), P.fixed(4, 2, distinct=2), P.fixed(4, 1, part="summary"),
                                     P.custom(lambda b, h, q, k: q - k < 2, "band2", per_head=False)], ids=str)
def test_torch_backend_gradcheck_float64(pattern):
    q, k, v = qkv((1, 2, 10, 4), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: st.sparse_attention(a, b, c, pattern, backend="torch"), (q, k, v))


def test_query_without_keys_outputs_zero_and_zero_gradient():
    pattern = P.fixed(8, 2, part="summary")  # queries 0..5 of block 0 see no summary key yet
    for backend in ("torch", "reference"):
        q, k, v = qkv((1, 1, 12, 4), torch.float64, requires_grad=True)
        out = st.sparse_attention(q, k, v, pattern, backend=backend)
        assert torch.equal(out[0, 0, :6], torch.zeros(6, 4, dtype=torch.float64))
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, 0, :6], torch.zeros(6, 4, dtype=torch.float64))


def test_scale_default_and_explicit():
    q, k, v = qkv((1, 2, 9, 16), torch.float64)
    default = st.sparse_attention(q, k, v, P.strided(3), backend="torch")
    explicit = st.sparse_attention(q, k, v, P.strided(3), scale=0.25, backend="reference")
    assert_close(default, explicit)
    other = st.sparse_attention(q, k, v, P.strided(3), scale=1.0, backend="torch")
    assert not torch.allclose(default, other)


def test_auto_picks_torch_on_cpu():
    q, _, _ = qkv((1, 1, 4, 4), torch.float32)
    assert choose_backend(q, P.strided(2)) == "torch"
    assert set(BACKENDS) >= {"reference", "torch"}


@pytest.mark.parametrize("args,message", [
    (dict(q=torch.zeros(2, 3, 4)), "q must be 4-D"),
    (dict(k=torch.zeros(1, 2, 5, 8)), "q and k must have one shape"),
    (dict(v=torch.zeros(1, 2, 5, 8)), r"v the shape \[B, H, N, Dv\]"),
    (dict(v=torch.zeros(1, 2, 4, 0)), "head widths must be >= 1"),
    (dict(v=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), "share dtype"),
    (dict(q=torch.zeros(1, 2, 4, 8, dtype=torch.long)), "floating-point"),
    (dict(backend="cuda_magic"), "backend must be 'auto' or one of"),
    (dict(scale=-1.0), "scale must be a finite number > 0"),
    (dict(scale=True), "scale must be a finite number > 0"),
    (dict(scale=10 ** 400), "scale must be a finite number > 0"),  # was an OverflowError
    (dict(scale=1e300), "scale 1e\\+300 is outside what torch.float32 holds"),  # fp32 scores were NaN
    (dict(backend=["torch"]), "backend must be 'auto' or one of"),  # was a TypeError
    (dict(pattern=P.custom(lambda b, h, q, k: torch.ones(3, dtype=torch.bool))), "elementwise"),
    (dict(pattern="strided"), "pattern must be a sparse_transformer Pattern"),
])
def test_bad_inputs(args, message):
    call = dict(q=torch.zeros(1, 2, 4, 8), k=torch.zeros(1, 2, 4, 8), v=torch.zeros(1, 2, 4, 8),
                pattern=P.strided(2), backend="torch")
    call.update(args)
    with pytest.raises(ValueError, match=message):
        st.sparse_attention(**call)


@pytest.mark.parametrize("pattern", [P.dense(), P.strided(4), P.fixed(4, 1, distinct=2),
                                     P.custom(lambda b, h, q, k: (q - k) % 3 == 0, "thirds", per_head=False)], ids=str)
def test_half_size_queries_and_keys(pattern):
    """q/k narrower than v (the paper's half-size attention): the output has v's width."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 21, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = st.sparse_attention(q, k, v, pattern, backend="torch")
    ref = st.sparse_attention(q, k, v, pattern, backend="reference")
    assert out.shape == (2, 3, 21, 8)
    assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        assert_close(got, want)


def test_numpy_scale_and_empty_batches():
    import numpy as np
    q, k, v = qkv((1, 2, 6, 8), torch.float32)
    assert_close(st.sparse_attention(q, k, v, P.strided(2), scale=np.float32(0.5), backend="torch"),
                 st.sparse_attention(q, k, v, P.strided(2), scale=0.5, backend="torch"))
    for shape in ((0, 2, 6, 8), (1, 0, 6, 8), (1, 2, 0, 8)):  # per-head patterns with no heads included
        x = torch.zeros(shape)
        for backend in ("reference", "torch"):
            assert st.sparse_attention(x, x, x, P.fixed(4, 2, distinct=2), backend=backend).shape == shape


MEMORY_SCRIPT = r"""
import resource, torch, sparse_transformer as st
torch.manual_seed(0)
n = 16384
q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = st.sparse_attention(q, k, v, st.patterns.strided(128), backend="torch")
out.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_torch_backend_memory_is_far_below_n_squared():
    """N = 16,384, stride 128: an N x N fp32 score matrix alone would be 1 GiB; forward plus
    backward of the torch backend grows the process by about 0.2 GiB (the reference: 7 GiB)."""
    peak = int(subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1])
    n_squared_bytes = 16384 ** 2 * 4
    assert peak < n_squared_bytes / 4, f"peak growth {peak / 2**20:.0f} MiB"
