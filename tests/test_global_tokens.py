"""``global_tokens(count)``, the part added as one module (patterns/global_tokens.py): its mask,
counts, spec and checks, and every backend and the cache on unions with it."""

import importlib.util
import os

import pytest
import torch

import sparse_transformer as st
from parts_cases import LENGTHS, brute_force
from sparse_transformer.kvcache import KeyPlan
from sparse_transformer.layout import cost, keys_per_query
from test_unions import against_reference
from tolerances import assert_close, assert_close_norm

P = st.patterns
UNIONS = [P.local(6) | P.global_tokens(4), P.local(5) | P.column(8) | P.global_tokens(3),
          P.global_tokens(10) | P.fixed(8, 2, 2), P.global_tokens(2) | P.column(3) | P.block(6)]
needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")


def test_mask_counts_and_spec():
    part = P.global_tokens(5)
    assert torch.equal(part.mask(12), brute_force(part, 12, 0))
    assert part.mask(12)[11].tolist() == [True] * 5 + [False] * 7  # no window: only the first five
    assert part.spec == "global_tokens:5" and P.parse("global_tokens:5") == part
    union = P.parse("local:256+global_tokens:16")
    assert union == P.local(256) | P.global_tokens(16) and union.spec == "global_tokens:16+local:256"
    assert P.global_tokens(3) | P.global_tokens(7) == P.global_tokens(7)
    for n in LENGTHS:
        assert torch.equal(keys_per_query(part, n, 0), part.mask(n).sum(-1))
    assert cost(P.global_tokens(64) | P.local(512), 10 ** 11).max_keys_per_query == 576


@pytest.mark.parametrize("call,message", [
    (lambda: P.global_tokens(0), "count must be >= 1"),
    (lambda: P.global_tokens(2 ** 31), r"count must be >= 1 and <= 2,147,483,647"),
    (lambda: P.parse("global_tokens"), "expected global_tokens:count"),
])
def test_invalid(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("pattern", UNIONS, ids=str)
def test_torch_backend(pattern):
    for n in LENGTHS:
        against_reference("torch", pattern, (1, 2, n, 8), torch.float32, assert_close, seed=n)


@needs_interpreter
@pytest.mark.parametrize("pattern", UNIONS[:2], ids=str)
def test_triton_backend(pattern):
    for n in LENGTHS:
        against_reference("triton", pattern, (1, 2, n, 16), torch.float16, assert_close_norm, seed=n)


@pytest.mark.parametrize("pattern", UNIONS, ids=str)
def test_cache_reads_each_key_once(pattern):
    plan = KeyPlan([pattern], 2, 37)
    for t in range(37):
        for h, chosen in enumerate(plan.keys(t)):
            assert chosen == pattern.mask(37, head=h)[t].nonzero().flatten().tolist(), (t, h)


def test_flex_decomposed_and_concatenated_forms_on_cpu():
    """The benchmark's Flex forms (eager on the CPU: forward only) equal the reference."""
    from sparse_transformer.attention import BACKENDS
    from sparse_transformer.attention.concatenated import concatenated_supported
    from sparse_transformer.benchmark import flex_forms

    pattern = P.local(40) | P.global_tokens(16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    ref = BACKENDS["reference"].load()(q, k, v, pattern, 0.25)
    assert_close(flex_forms.decomposed(q, k, v, pattern, 0.25), ref, torch.float32)
    assert concatenated_supported(pattern)
    assert_close(flex_forms.concatenated(q, k, v, pattern, 0.25), ref, torch.float32)


@needs_interpreter
def test_triton_splits_the_queries_of_few_global_key_tiles():
    """Global tokens' dK/dV has few key tiles, each seen by every query: several programs share a
    tile's queries and their fp32 shares are added up. Same gradients as the reference."""
    from sparse_transformer.attention import triton_kernels as tk
    from sparse_transformer.attention.triton_sparse import KernelConfig, _pass_plan, plan, triton_attention

    pattern = P.global_tokens(16) | P.local(24)
    config = KernelConfig(tiles=(16, 16, 1, 1))
    _, _, dkdv = _pass_plan(plan(pattern, 257), torch.Size((1, 2, 257, 16)), 16, config, False, True, tk)
    assert not dkdv[0].constexprs["SPLIT"]  # the window first (it writes every key): one program a key tile
    assert dkdv[1].constexprs["SPLIT"] and dkdv[1].args[-1] == 4  # 17 query tiles: 4 shares of at most 5
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 257, 16, generator=g).half().requires_grad_() for _ in range(3))
    out = triton_attention(q, k, v, pattern, 0.25, config)
    grad = torch.randn(out.shape, generator=g).half()
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    from sparse_transformer.attention import BACKENDS
    ref = BACKENDS["reference"].load()(q64, k64, v64, pattern, 0.25)
    ref.backward(grad.double())
    for x, y in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert_close_norm(x, y, torch.float16)


def test_flex_packed_column_form_on_cpu():
    """The column part's packed Flex form (columns laid end to end, one block-diagonal sequence)
    equals its transposed-view form and, merged with the window, the reference (eager flex, forward)."""
    from sparse_transformer.attention import BACKENDS
    from sparse_transformer.attention.concatenated import concatenated_supported
    from sparse_transformer.benchmark import flex_forms

    pattern = P.strided(16)  # N = 256: columns of 16 rows, several to one of Flex's 128-row tiles
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 256, 16, generator=g) for _ in range(3))
    column, earlier = flex_forms.part_forms(pattern)[1]
    assert set(column.flex_forms()) == {"", "packed"}
    plain, packed = column.flex(q, k, v, 0.25, earlier), column.flex_packed(q, k, v, 0.25, earlier)
    for a, b in zip(packed, plain):
        assert_close(a, b, torch.float32)
    ref = BACKENDS["reference"].load()(q, k, v, pattern, 0.25)
    assert_close(flex_forms.decomposed(q, k, v, pattern, 0.25, ("", "packed")), ref, torch.float32)
