"""Triton kernels (CPU interpreter, TRITON_INTERPRET=1) and the flex backend against the reference.

Small shapes only: the interpreter runs every program in numpy. The GPU versions of these checks,
at N up to 65,536, are in test_gpu.py.
"""

import importlib.util
import os

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.attention import BACKENDS, choose_backend
from tolerances import assert_close, assert_close_norm

P = st.patterns

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'sparse-transformer[triton]')")
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors need the Triton interpreter (TRITON_INTERPRET=1, which conftest sets when there is no "
           "CUDA); the GPU versions of these checks are in test_gpu.py")


def qkv(shape, dtype, seed, value_dim=None):
    """q, k of ``shape`` and v of ``shape`` with its last dimension ``value_dim`` (default: the same)."""
    g = torch.Generator().manual_seed(seed)
    shapes = (shape, shape, (*shape[:-1], value_dim or shape[-1]))
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def check_against_reference(backend, pattern, shape, dtype, seed=0, device="cpu", grads=True, compare=None):
    """Outputs and (with ``grads``) dq/dk/dv of ``backend`` against the float64 reference."""
    q, k, v = (x.detach().to(device).requires_grad_(grads) for x in qkv(shape, dtype, seed))
    out = BACKENDS[backend].load()(q, k, v, pattern, shape[-1] ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    if compare is None:  # see tolerances.KERNEL_REL_NORM
        compare = assert_close if backend == "flex" else assert_close_norm
    if not grads:
        ref = BACKENDS["reference"].load()(q.double(), k.double(), v.double(), pattern, shape[-1] ** -0.5)
        compare(out, ref, dtype)
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = BACKENDS["reference"].load()(q64, k64, v64, pattern, shape[-1] ** -0.5)
    ref.backward(grad.double())
    compare(out, ref, dtype)
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        assert torch.isfinite(x.grad).all()
        compare(x.grad, x64.grad, dtype)


CASES = [  # (pattern, N, D, dtype): N never a multiple of the 64-row tiles; stride > N; distinct > 1
    (P.dense(), 70, 16, torch.float16),
    (P.strided(16), 150, 32, torch.bfloat16),
    (P.strided(4, "row"), 70, 16, torch.float16),
    (P.strided(4, "column"), 70, 16, torch.bfloat16),
    (P.strided(1), 40, 16, torch.float16),
    (P.strided(100), 40, 16, torch.float16),  # stride > N: the column holds only j = i
    (P.strided(8), 128, 32, torch.bfloat16),  # columns of 16 rows: packed, four to a 64-row tile
    (P.fixed(16, 4), 150, 32, torch.float16),
    (P.fixed(8, 2, distinct=3), 70, 16, torch.bfloat16),
    (P.fixed(8, 2, distinct=3, part="summary"), 70, 16, torch.float16),  # early queries see no key
    (P.fixed(5, 1, part="local"), 70, 16, torch.float16),
    (P.fixed(8, 8), 40, 16, torch.float16),  # summary == stride: merged = dense
    (P.fixed(128, 32, distinct=2), 100, 64, torch.bfloat16),  # stride > N
]


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern,n,d,dtype", CASES, ids=lambda x: str(x))
def test_triton_matches_reference(pattern, n, d, dtype):
    check_against_reference("triton", pattern, (1, 2, n, d), dtype, seed=n + d)


def check_triton_config(pattern, config, shape, dtype, seed, scale=None, value_dim=None):
    """The triton backend with kernel ``config`` against the float64 reference, outputs and grads."""
    from sparse_transformer.attention.triton_sparse import triton_attention

    q, k, v = qkv(shape, dtype, seed, value_dim)
    scale = shape[-1] ** -0.5 if scale is None else scale
    out = triton_attention(q, k, v, pattern, scale, config)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = BACKENDS["reference"].load()(q64, k64, v64, pattern, scale)
    ref.backward(grad.double())
    assert_close_norm(out, ref, dtype)
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        assert_close_norm(x.grad, x64.grad, dtype)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern", [P.strided(8), P.strided(40), P.fixed(16, 4, distinct=2), P.dense()], ids=str)
def test_triton_small_tiles_reach_the_unmasked_interior(pattern):
    """16x16 tiles at N = 300: every part (row band, column view, local block, merged summary)
    has tiles with no mask arithmetic, which 64-wide tiles at CPU-test lengths rarely reach."""
    from sparse_transformer.attention.triton_sparse import KernelConfig

    check_triton_config(pattern, KernelConfig(tiles=(16, 16, 1, 1)), (1, 2, 300, 16), torch.float16, seed=31)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern,n,tma", [(P.strided(8), 150, False), (P.fixed(16, 4, distinct=2), 150, False),
                                           (P.dense(), 70, False), (P.fixed(16, 4), 128, True)], ids=str)
def test_triton_half_size_queries_and_keys(pattern, n, tma):
    """q/k half as wide as v (the paper's half-size layers): the kernels take both widths, no padding;
    with ``tma`` the loops load both through descriptors of their own widths."""
    from sparse_transformer.attention.triton_sparse import KernelConfig

    check_triton_config(pattern, KernelConfig(tiles=(32, 32, 4, 2), tma=tma), (1, 2, n, 16), torch.float16,
                        seed=n, value_dim=32)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern", [P.strided(16), P.fixed(16, 4, distinct=2)], ids=str)
def test_triton_backward_with_its_own_tile_shapes(pattern):
    """Tall dK/dV tiles and wide dQ tiles, each unlike the forward's: same gradients."""
    from sparse_transformer.attention.triton_sparse import KernelConfig

    config = KernelConfig(tiles=(32, 32, 4, 3), dkdv=(16, 64, 4, 3), dq=(64, 16, 4, 3))
    check_triton_config(pattern, config, (1, 2, 150, 32), torch.float16, seed=21)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern,n,tiles", [
    (P.strided(4), 256, (16, 16, 1, 1)),  # columns of 64 rows, four tiles each
    (P.strided(5), 318, (16, 16, 1, 1)),  # a ragged last row: columns 3 and 4 are one row shorter
    (P.strided(4), 384, (64, 64, 4, 2)),  # columns of 96 rows: one full tile and one half tile
    (P.strided(7, "column"), 100, (16, 16, 1, 1)),  # columns of 15 rows (and 14), shorter than a tile
], ids=str)
def test_triton_strided_column_tiles(pattern, n, tiles):
    """The column part over the [N/stride, stride] view: whole tiles, partial tiles and columns one
    row short."""
    from sparse_transformer.attention.triton_sparse import KernelConfig, plan

    assert not plan(pattern, n)[-1].packed
    check_triton_config(pattern, KernelConfig(tiles=tiles), (1, 2, n, 16), torch.float16, seed=n)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern,n,tiles", [
    (P.strided(8), 160, (64, 64, 4, 2)),  # columns of 20 rows: a tile ends inside its fourth column
    (P.strided(8), 160, (16, 16, 1, 1)),  # a column spans two tiles, one of them shared with the next
    (P.strided(4), 128, (64, 64, 4, 2)),  # columns of 32 rows, the most that are packed: two a tile
    (P.strided(16, "column"), 256, (64, 64, 4, 2)),  # the column part alone keeps j = i
    (P.strided(8), 160, (16, 64, 4, 2)),  # dK/dV: 16-query steps over 64 keys; the forward's 16 x 64
], ids=str)
def test_triton_packed_short_columns(pattern, n, tiles):
    """Columns of at most PACKED_COLUMN_ROWS rows, laid end to end so that a tile holds several:
    a block-diagonal part of width N/stride over that view, against the reference."""
    from sparse_transformer.attention.triton_sparse import PACKED_COLUMN_ROWS, KernelConfig, plan

    column = plan(pattern, n)[-1]
    assert column.packed and column.width == n // pattern.stride <= PACKED_COLUMN_ROWS
    check_triton_config(pattern, KernelConfig(tiles=tiles), (1, 2, n, 16), torch.float16, seed=n)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("pattern,n,tiles", [
    (P.dense(), 150, (16, 16, 1, 1)),  # row views: any N, the tail zero-padded by the copy engine
    (P.strided(8), 320, (16, 16, 1, 1)),  # the column view (40 rows, not packed): N a multiple of the stride
    (P.strided(8), 160, (16, 16, 1, 1)),  # packed columns (20 rows): pointers, the row part TMA
    (P.fixed(16, 4, distinct=2), 150, (16, 16, 1, 1)),  # C divides the tile: 4 sub-blocks a tile
    (P.fixed(16, 4, distinct=2), 160, (16, 16, 1, 1)),  # N whole blocks: the summary view too
    (P.fixed(64, 32, distinct=2), 192, (16, 16, 1, 1)),  # the tile divides C: half a sub-block a tile
    (P.fixed(8, 2, distinct=3, part="summary"), 72, (64, 64, 4, 2)),  # 32 sub-blocks a tile, 9 there
    (P.global_tokens(20) | P.local(40), 150, (16, 16, 1, 1)),  # one launch, two descriptors of the rows
], ids=str)
def test_triton_tma_descriptors_match_reference(pattern, n, tiles, monkeypatch):
    """``KernelConfig(tma=True)``: the loops load through tensor descriptors where they fit."""
    from sparse_transformer.attention import triton_kernels as tk
    from sparse_transformer.attention.triton_sparse import KernelConfig, plan

    launched = []

    class Spy:  # records each launch's TMA flag, then launches
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["TMA"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        monkeypatch.setattr(tk, name, Spy(getattr(tk, name)))
    check_triton_config(pattern, KernelConfig(tiles=tiles, tma=True), (1, 2, n, 16), torch.float16, seed=n)
    assert any(launched)
    # The fixed summary view needs N whole blocks and packed columns are no box: everything else fits.
    packed = isinstance(pattern, P.Strided) and plan(pattern, n)[-1].packed
    assert all(launched) == ((n % getattr(pattern, "stride", 1) == 0 or not isinstance(pattern, P.Fixed))
                             and not packed)


@needs_triton
@needs_interpreter
def test_triton_tma_falls_back_to_pointers_for_unaligned_inputs():
    """A contiguous view that starts 2 bytes into its storage cannot feed the copy engine."""
    from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention

    q, k, v = qkv((1, 2, 64, 16), torch.float16, seed=4)
    shifted = torch.empty(k.numel() + 1, dtype=k.dtype)[1:].view(k.shape)
    shifted.copy_(k.detach())
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    out = triton_attention(q, shifted, v, P.dense(), 0.25, KernelConfig(tma=True))
    ref = BACKENDS["reference"].load()(q.double(), k.double(), v.double(), P.dense(), 0.25)
    assert_close_norm(out, ref, torch.float16)


def test_tma_fits_only_views_a_descriptor_reaches_exactly():
    from sparse_transformer.attention.triton_sparse import plan, tma_fits

    row, column = plan(P.strided(8), 320)
    assert tma_fits(row, 150, 64, keys=True) and tma_fits(column, 320, 64, keys=True)
    assert not tma_fits(column, 150, 64, keys=True)  # the [N/8, 8] view needs 8 | N
    assert not tma_fits(plan(P.strided(8), 160)[1], 160, 64, keys=True)  # packed columns: no box
    local, summary = plan(P.fixed(16, 4), 160)
    assert tma_fits(local, 150, 64, keys=True) and tma_fits(summary, 160, 64, keys=True)
    assert tma_fits(summary, 150, 64, keys=False)  # the summary part's queries are plain rows
    assert not tma_fits(summary, 150, 64, keys=True)  # N not whole blocks
    assert not tma_fits(plan(P.fixed(16, 3), 160)[1], 160, 64, keys=True)  # C not a power of two
    assert tma_fits(plan(P.fixed(256, 128), 512)[1], 512, 64, keys=True)  # the tile divides C


@needs_triton
@pytest.mark.parametrize("pattern,n,registers", [
    (P.strided(128), 16384, [True, True]),  # row band, then column view: short loops
    (P.strided(128), 4096, [True, True]),  # packed columns
    (P.fixed(128, 32), 16384, [False]),  # one launch, its summary part a long loop
    (P.fixed(128, 32, part="local"), 16384, [True]),
    (P.dense(), 16384, [False]),
], ids=str)
def test_forward_keeps_q_in_registers_for_short_loops_only(pattern, n, registers):
    """Each forward launch's ``Q_IN_REGISTERS`` (measured: faster for short loops, slower for long)."""
    from sparse_transformer.attention import triton_kernels as tk
    from sparse_transformer.attention.triton_sparse import KernelConfig, _pass_plan, plan

    forward, dq, _ = _pass_plan(plan(pattern, n), torch.Size((1, 8, n, 64)), 64, KernelConfig(), True, False, tk)
    assert [launch.constexprs["Q_IN_REGISTERS"] for launch in forward] == registers
    assert all("Q_IN_REGISTERS" not in launch.constexprs for launch in dq)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_triton_nonpositive_scale(scale):
    """The forward kernel needs scale > 0 (row maxima before scaling): other scales are rewritten."""
    from sparse_transformer.attention.triton_sparse import KernelConfig

    check_triton_config(P.fixed(16, 4), KernelConfig(), (1, 2, 70, 16), torch.float16, seed=9, scale=scale)


@needs_triton
@needs_interpreter
def test_triton_head_dim_128_and_batch():
    check_against_reference("triton", P.strided(32), (2, 1, 80, 128), torch.bfloat16, seed=3)


@needs_triton
@needs_interpreter
def test_triton_query_without_keys_gets_zero_output_and_gradient():
    q, k, v = qkv((1, 1, 12, 16), torch.float16, seed=5)
    out = BACKENDS["triton"].load()(q, k, v, P.fixed(8, 2, part="summary"), 0.25)
    assert torch.equal(out[0, 0, :6].float(), torch.zeros(6, 16))
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, 0, :6].float(), torch.zeros(6, 16))


def test_triton_refuses_what_it_cannot_run():
    q = torch.zeros(1, 1, 8, 16)
    assert not BACKENDS["triton"].supports(q, q, P.strided(4))  # fp32
    assert not BACKENDS["triton"].supports(q.half(), q.half(), P.custom(lambda b, h, i, j: i == j, per_head=False))
    odd = torch.zeros(1, 1, 8, 24, dtype=torch.float16)
    assert not BACKENDS["triton"].supports(odd, odd, P.strided(4))
    assert not BACKENDS["triton"].supports(q.half(), odd, P.strided(4))  # a value width it has no tile for
    assert not BACKENDS["flex"].supports(q, q, P.strided(4))  # flex needs CUDA
    with pytest.raises(ValueError, match="cannot run"):
        st.sparse_attention(q, q, q, P.strided(4), backend="triton")


def test_triton_refuses_lengths_past_its_int32_offsets():
    """N x D must stay below 2^31 (the kernels' row offsets are int32): auto goes elsewhere."""
    huge = torch.zeros(1, dtype=torch.float16).expand(1, 1, 2 ** 25, 64)  # no memory: a broadcast view
    assert not BACKENDS["triton"].supports(huge, huge, P.strided(128))
    assert BACKENDS["triton"].supports(huge[:, :, : 2 ** 24], huge[:, :, : 2 ** 24], P.strided(128)) == (
        os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None)


def test_auto_never_picks_a_gpu_backend_for_cpu_tensors():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.zeros(1, 1, 8, 16, dtype=dtype)
        assert choose_backend(q, P.strided(4)) == "torch"
        assert choose_backend(q, P.custom(lambda b, h, i, j: i == j, per_head=False)) == "torch"


@pytest.mark.parametrize("pattern", [
    P.custom(lambda b, h, q, k: (q - k) % 3 == 0, "every_third", per_head=False),
    P.custom(lambda b, h, q, k: k % 4 == h % 4, "per_head_columns"),
    P.fixed(8, 2, distinct=2),
], ids=str)
def test_flex_matches_reference_on_cpu_eager(pattern):
    """The flex backend's code path (block mask from mask_mod, per-head masks) in eager mode;
    flex has no CPU backward (test_gpu.py checks gradients on CUDA)."""
    check_against_reference("flex", pattern, (1, 2, 150, 16), torch.float32, seed=11, grads=False)


def test_custom_patterns_are_distinct_cache_keys():
    a = P.custom(lambda b, h, q, k: q == k, "same", per_head=False)
    b = P.custom(lambda b, h, q, k: q == k, "same", per_head=False)
    assert a == a and a != b and len({a, b}) == 2


@needs_triton
def test_kernel_config_strings():
    from sparse_transformer.attention.triton_sparse import KernelConfig, plan
    parse_config = KernelConfig.from_spec

    assert parse_config("128,64,4,3") == KernelConfig(tiles=(128, 64, 4, 3))
    config = parse_config("local:64,32,4,3/global:128,64,8,3")
    assert config == KernelConfig(local=(64, 32, 4, 3), global_=(128, 64, 8, 3))
    row, column = plan(st.patterns.strided(128), 16384)  # columns of 128 rows: a global part
    assert config.resolve(64, row) == (64, 32, 4, 3) and config.resolve(64, column) == (128, 64, 8, 3)
    packed = plan(st.patterns.strided(128), 4096)[1]  # columns of 32 rows, packed: a local part
    assert packed.packed and config.resolve(64, packed) == (64, 32, 4, 3)
    assert KernelConfig().resolve(64, column) == (64, 64, 4, 3)
    # Short parts' dK/dV defaults to 32-query steps under a register cap; a set config drops the cap.
    assert KernelConfig().launch(64, column, "dkdv") == ((32, 64, 4, 2), 168)
    assert KernelConfig().launch(64, row, "dkdv") == ((32, 64, 4, 2), 168)
    assert KernelConfig().launch(128, row, "dkdv") == ((64, 64, 4, 2), None)
    assert config.launch(64, row, "dkdv") == ((64, 32, 4, 3), None)
    dense, = plan(st.patterns.dense(), 4096)
    assert KernelConfig().launch(64, dense, "dkdv") == ((64, 64, 4, 3), None)
    backward = parse_config("global:128,64,8,3/dkdv:32,128,4,3/dq:128,32,8,2")
    assert backward.resolve(64, column) == (128, 64, 8, 3)
    assert backward.resolve(64, column, "dkdv") == (32, 128, 4, 3)
    assert backward.resolve(64, row, "dq") == (128, 32, 8, 2)
    with pytest.raises(ValueError, match="unknown key 'middle'"):
        parse_config("middle:64,64,4,3")
    with pytest.raises(ValueError, match="BLOCK_M,BLOCK_N,WARPS,STAGES"):
        parse_config("64,64")
    assert parse_config("dq:64,32,4,3/tma:0") == KernelConfig(dq=(64, 32, 4, 3), tma=False)
    with pytest.raises(ValueError, match="tma takes 0 or 1"):
        parse_config("tma:yes")
    # The spec string is how a config travels through the registered op: it round-trips.
    for config in (KernelConfig(), backward, parse_config("dq:64,32,4,3/tma:0"), KernelConfig(tiles=(64, 32, 4, 2))):
        assert parse_config(config.spec) == config
