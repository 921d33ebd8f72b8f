"""Every backend on unions of parts against the float64 reference, forward and backward (issue 27):
random unions of up to three parts at N in {1, 63, 64, 100, 257}."""

import importlib.util
import os

import pytest
import torch

import sparse_transformer as st
from parts_cases import LENGTHS, random_unions
from test_triton import check_against_reference
from tolerances import assert_close, assert_close_norm

P = st.patterns
UNIONS = random_unions(seed=7, count=10)
NAMED = [P.local(6) | P.column(4), P.block(8) | P.summary(6, 2, 2), P.local(7) | P.block(12) | P.summary(8, 2),
         P.column(3) | P.column(5) | P.block(4), P.summary(8, 2, 2) | P.summary(6, 3), P.local(20) | P.column(7)]


def qkv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


def against_reference(backend, pattern, shape, dtype, compare, seed=0):
    check_against_reference(backend, pattern, shape, dtype, seed=seed, compare=compare)


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


# ------------------------------------------------------------------ triton (CPU interpreter)
needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors need the Triton interpreter (conftest sets TRITON_INTERPRET=1 without CUDA); "
           "the GPU versions are in test_gpu.py")
# Each overlap a kernel handles: a window before a column (DMIN in column rows), a window before a
# block (DMIN = W), a block before the summary of its stride (DMIN = 1, one fused launch), and the
# position tests: a block before a column and two columns, a column and a block of another stride
# before a summary, two summaries with per-head offsets.
KERNEL_UNIONS = [P.local(20) | P.column(7), P.local(3) | P.block(8) | P.summary(8, 2, 2),
                 P.column(3) | P.column(5) | P.block(4), P.block(12) | P.column(5) | P.summary(8, 2),
                 P.summary(8, 2, 2) | P.summary(6, 3)]


@needs_interpreter
@pytest.mark.parametrize("pattern", KERNEL_UNIONS, ids=str)
def test_triton_on_unions(pattern):
    for n in LENGTHS:
        against_reference("triton", pattern, (1, 2, n, 16), torch.float16, assert_close_norm, seed=n)


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("pattern", random_unions(seed=11, count=8), ids=str)
def test_triton_on_random_unions(pattern):
    for n in LENGTHS:
        against_reference("triton", pattern, (1, 2, n, 16), torch.bfloat16, assert_close_norm, seed=n)


@needs_interpreter
@pytest.mark.parametrize("pattern", [P.global_tokens(1024), P.global_tokens(600) | P.local(16),
                                     P.global_tokens(8) | P.local(16)], ids=str)
def test_triton_split_global_tokens_dkdv(pattern):
    """Global tokens' dK/dV splits its queries between programs whose fp32 shares the host adds up
    (N = 512: 8 key tiles). With count >= N that part covers every key; its launch still leaves the
    sum to the host, so dK/dV must start at zero (they once started uninitialised: NaN)."""
    against_reference("triton", pattern, (1, 1, 512, 16), torch.bfloat16, assert_close_norm, seed=3)


@needs_interpreter
@pytest.mark.parametrize("pattern", [P.fixed(16, 4, distinct=2), P.global_tokens(40) | P.summary(16, 3, 4)], ids=str)
def test_triton_distinct_summaries_on_one_head(pattern):
    """distinct > 1 with a single head: one offset in use, so the kernels take it as an int, not a
    table (the flag and the argument once disagreed, and the launch failed)."""
    against_reference("triton", pattern, (2, 1, 100, 16), torch.float16, assert_close_norm, seed=4)


def test_triton_dkdv_launches_start_with_a_part_that_writes_every_key():
    """A part that stores every key row goes first in the dK/dV launches (no zeroing of dK, dV);
    global tokens (kept to their first keys, maybe split) and summary slots never do."""
    from sparse_transformer.attention import triton_kernels
    from sparse_transformer.attention.triton_sparse import KernelConfig, _pass_plan, plan
    from sparse_transformer.patterns.plans import BAND, BLOCK, SUMMARY

    def dkdv(pattern, n):
        launches = _pass_plan(plan(pattern, n), torch.Size((1, 2, n, 16)), 16, KernelConfig(), False, True,
                              triton_kernels)[2]
        return [(launch.parts[0].mode, launch.parts[0].keys, launch.constexprs["ACCUMULATE"]) for launch in launches]

    assert dkdv(P.global_tokens(64) | P.local(512), 4096) == [(BAND, 0, False), (BAND, 64, True)]
    assert dkdv(P.global_tokens(4096), 1024) == [(BAND, 1024, True)]  # covers every key, but keyed: zeroed first
    assert dkdv(P.fixed(16, 4), 256) == [(BLOCK, 0, False), (SUMMARY, 0, True)]
    assert dkdv(P.summary(16, 4), 256) == [(SUMMARY, 0, True)]


def test_triton_plans_come_from_the_parts():
    """Strided and fixed keep their launches; other overlaps are excluded by position tests."""
    from sparse_transformer.attention.triton_sparse import _launches, plan
    from sparse_transformer.patterns.plans import BAND, BLOCK, SUMMARY

    row, column = plan(P.strided(128), 16384)
    assert (row.mode, row.width, row.dmin, column.mode, column.step, column.dmin) == (BAND, 128, 0, BAND, 128, 1)
    assert not row.exclude and not column.exclude
    block, summary = plan(P.fixed(128, 32, 4), 16384)
    assert (block.mode, summary.mode, summary.dmin, summary.offsets) == (BLOCK, SUMMARY, 1, (96, 64, 32, 0))
    assert len(_launches((block, summary))) == 1  # one fused launch, as before
    window, col = plan(P.local(300) | P.column(128), 4096)
    assert col.dmin == 3 and not col.exclude  # rows 0, 1, 2 of the column lie in the window
    _, wide_block = plan(P.local(5) | P.block(64), 4096)
    assert wide_block.dmin == 5
    block, col, summ = plan(P.block(12) | P.column(5) | P.summary(8, 2), 256)
    assert [p.mode for p in col.exclude] == [BLOCK] and [p.mode for p in summ.exclude] == [BLOCK, BAND]
    # global tokens share the launch of the window or block after them; a summary pair comes first
    modes = lambda pattern: [[p.mode for p in launch] for launch in _launches(plan(pattern, 4096))]  # noqa: E731
    assert modes(P.global_tokens(64) | P.local(512)) == [[BAND, BAND]]
    assert modes(P.global_tokens(16) | P.local(128) | P.column(128)) == [[BAND, BAND], [BLOCK]]  # column packed
    assert modes(P.global_tokens(7) | P.block(64) | P.summary(128, 16, 4)) == [[BAND], [BLOCK, SUMMARY]]
    assert modes(P.global_tokens(7) | P.global_tokens(9)) == [[BAND]]  # one part: the larger holds the smaller


@pytest.mark.slow
def test_union_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs kernels as Python; this compiles every launch of unions with two
    position tests, per-head summary offsets and global tokens' split dK/dV for sm_90, as the JIT
    would on a GPU (benchmarks/kernel_resources.py), so a kernel that only the compiler rejects fails here."""
    import subprocess
    import sys
    from pathlib import Path

    spec = importlib.util.find_spec("triton")
    if spec is None or not (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("needs Triton's CUDA backend (ptxas and cuobjdump ship in its wheel)")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root / "src")
    for pattern, launches in (("block:64+column:33+summary:128:16:4", 9), ("window_column_global", 7),
                              ("window_global", 4)):
        done = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_resources.py"), "--pattern", pattern,
                               "--n", "1024", "--tokens", "2048"], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [line.split() for line in done.stdout.splitlines() if "registers" in line]
        assert len(rows) == launches and all(0 < int(r[r.index("registers") + 1]) <= 255 for r in rows)
