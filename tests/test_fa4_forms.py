"""The FlashAttention-4 forms of the fixed pattern (issue 28's benchmark): the gathered layout and its
closed-form mask on the CPU; the kernels themselves on a GPU with flash-attn-4 installed."""

import dataclasses

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.attention import fa4
from sparse_transformer.attention.concatenated import concatenated_keys, concatenated_layout
from sparse_transformer.benchmark import fa4_forms
from tolerances import assert_close, assert_close_norm

P = st.patterns
# N a multiple of the stride or not; one or several summary groups; summaries narrower than the stride
CASES = [(P.fixed(8, 2), 64), (P.fixed(8, 2, 4), 61), (P.fixed(16, 4, 2), 100), (P.fixed(5, 2, 2), 37),
         (P.fixed(12, 3, 1), 12)]


@pytest.mark.parametrize("pattern,n", CASES, ids=str)
def test_closed_form_mask_equals_the_layouts_position_table(pattern, n):
    """gathered_fixed_mask admits exactly the pairs that the layout's own mask (which looks the key
    positions up) admits, over every query and every key of [sequence | gathered slots]."""
    heads = 4
    positions, block = concatenated_layout(pattern, heads, n, "cpu")
    stride, summary = fa4.fixed_sizes(pattern)
    q_idx = torch.arange(n)[:, None]
    kv_idx = torch.arange(positions.shape[1])[None, :]
    closed = fa4.gathered_fixed_mask(q_idx, kv_idx, n, stride, summary)
    for h in range(heads):
        table = block.mask_mod(torch.tensor(0), torch.tensor(h), q_idx, kv_idx)
        assert torch.equal(closed, table), (h, (closed != table).nonzero()[:5])


@pytest.mark.parametrize("pattern,n", CASES, ids=str)
def test_gathered_layout_with_the_closed_form_is_the_fixed_pattern(pattern, n):
    """One softmax over the gathered keys under the closed-form mask (what the kernel computes) equals
    the float64 reference of the pattern, values and gradients."""
    heads, width = 4, 8
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, heads, n, width, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    keys, values, _ = concatenated_keys(q, k, v, pattern)
    stride, summary = fa4.fixed_sizes(pattern)
    mask = fa4.gathered_fixed_mask(torch.arange(n)[:, None], torch.arange(keys.shape[2])[None, :], n,
                                         stride, summary)
    scores = (q @ keys.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ values
    expected = st.sparse_attention(q, k, v, pattern, 0.3, backend="reference")
    assert_close(out, expected, torch.float64)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64)


def test_only_the_fixed_pattern_is_taken():
    for pattern in (P.strided(8), P.local(4) | P.global_tokens(2), P.block(8) | P.summary(16, 2)):
        with pytest.raises(ValueError, match="the fa4 backend runs the fixed pattern"):
            fa4.fixed_sizes(pattern)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["backend", "flex_flash"])
@pytest.mark.parametrize("pattern", [P.fixed(128, 32), P.fixed(128, 32, 4), P.fixed(64, 16)], ids=str)
def test_fa4_forms_against_the_reference(form, pattern):
    """The fa4 backend (FlashAttention-4 called directly) and Flex on its FLASH backend, values and
    gradients against the float64 reference; N = 2,000 is no multiple of the stride or tile."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper or newer GPU")
    if not fa4.available():
        pytest.skip(f"needs FlashAttention-4: {fa4.INSTALL}")
    n, heads, width = 2000, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, width, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    if form == "backend":
        out = st.sparse_attention(q, k, v, pattern, width ** -0.5, backend="fa4")
    else:
        out = fa4_forms.flex_flash(q, k, v, pattern, width ** -0.5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = st.sparse_attention(*ref, pattern, width ** -0.5, backend="reference")
    want = torch.autograd.grad(expected, ref, grad.double())
    assert_close_norm(out.double(), expected, torch.bfloat16)
    for a, b in zip(got, want):
        assert_close_norm(a.double(), b, torch.bfloat16)


@pytest.mark.gpu
def test_auto_takes_fa4_at_long_context():
    """On a Hopper GPU with flash-attn-4, auto runs fixed 128/32 at 32,768 tokens on fa4 (and on
    triton at 16,384), with values and gradients of the portable backend in float32."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper or newer GPU")
    if not fa4.available():
        pytest.skip(f"needs FlashAttention-4: {fa4.INSTALL}")
    from sparse_transformer.attention import choose_backend

    pattern, g = P.fixed(128, 32), torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, fa4.AUTO_MIN_TOKENS, 64, device="cuda", generator=g, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    assert choose_backend(q, pattern) == "fa4" and choose_backend(q[:, :, :16384], pattern) == "triton"
    out = st.sparse_attention(q, k, v, pattern)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    expected = st.sparse_attention(*ref, pattern, backend="torch")
    want = torch.autograd.grad(expected, ref, grad.float())
    assert_close_norm(out, expected, torch.bfloat16)
    for a, b in zip(got, want):
        assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("case", ["causal", "per_head_window", "positions_table", "block_or_prefix", "per_batch"])
def test_block_masks_built_in_bands_equal_create_block_mask(case):
    """make_block_mask (query bands, so a long mask never exists whole) gives create_block_mask's
    tiles: partial and full, per query tile and (for the backward) per key tile."""
    from torch.nn.attention.flex_attention import create_block_mask

    from sparse_transformer.attention.flex import make_block_mask

    positions = torch.randint(0, 300, (3, 700), generator=torch.Generator().manual_seed(1))
    mask_mods = {
        "causal": (lambda b, h, q, kv: kv <= q, None, 300, 300),
        "per_head_window": (lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 40 * (h + 1)), 3, 333, 333),
        "positions_table": (lambda b, h, q, kv: positions[h, kv] <= q, 3, 300, 700),
        "block_or_prefix": (lambda b, h, q, kv: (q // 64 == kv // 64) | (kv < 5), None, 200, 260),
        "per_batch": (lambda b, h, q, kv: (kv <= q) & ((q - kv) % (b + h + 2) == 0), 3, 256, 256),
    }
    mask_mod, heads, q_len, kv_len = mask_mods[case]
    batch = 2 if case == "per_batch" else None
    expected = create_block_mask(mask_mod, batch, heads, q_len, kv_len, device="cpu")
    got = make_block_mask(mask_mod, batch, heads, q_len, kv_len, "cpu", elements=128 * 300)  # one query tile a band
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
        assert getattr(got, name).dtype == torch.int32
    for count, name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                        ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        counts = getattr(expected, count)
        for index in counts.flatten().nonzero().flatten().tolist():
            row = tuple(torch.unravel_index(torch.tensor(index), counts.shape))
            used = int(counts[row])
            assert torch.equal(getattr(got, name)[row][:used], getattr(expected, name)[row][:used]), (name, row)
    assert got.seq_lengths == (q_len, kv_len) and got.BLOCK_SIZE == expected.BLOCK_SIZE


def test_fa4_backend_is_listed_and_refuses_what_it_cannot_run():
    """fa4 is listed, not chosen by auto here (no CUDA), and refused (naming the backend) off a
    Hopper GPU with flash-attn-4, or for a pattern other than fixed."""
    from sparse_transformer.attention import BACKENDS, available_backends, choose_backend

    assert "fa4" in BACKENDS
    q = torch.zeros(1, 2, 64, 64, dtype=torch.bfloat16)
    assert "fa4" not in available_backends(q, P.fixed(16, 4)) and choose_backend(q, P.fixed(16, 4)) != "fa4"
    with pytest.raises(ValueError, match="backend 'fa4' cannot run fixed"):
        st.sparse_attention(q, q, q, P.fixed(16, 4), 0.125, backend="fa4")
    assert not fa4.supports(q, q, P.strided(16)) and not fa4.supports(q.float(), q.float(), P.fixed(16, 4))



def test_auto_picks_fa4_only_where_it_was_measured_faster(monkeypatch):
    """With fa4 able to run (stubbed here), auto takes it for fixed 128/32 (any distinct count),
    D = 64, N >= 32,768, and for nothing shorter, wider, of another stride or summary width, or
    while torch.compile traces."""
    from sparse_transformer.attention import BACKENDS, choose_backend

    monkeypatch.setattr(fa4, "supports", lambda q, v, pattern: fa4.is_fixed(pattern))
    long = torch.zeros(1, 1, fa4.AUTO_MIN_TOKENS, 64, dtype=torch.bfloat16)
    assert fa4.auto_picks(long, long, P.fixed(128, 32)) and fa4.auto_picks(long, long, P.fixed(128, 32, 4))
    assert not fa4.auto_picks(long, long, P.fixed(128, 16)) and not fa4.auto_picks(long, long, P.fixed(128, 16, 4))
    assert not fa4.auto_picks(long[:, :, :-128], long[:, :, :-128], P.fixed(128, 32))
    assert not fa4.auto_picks(long, long, P.fixed(256, 32)) and not fa4.auto_picks(long, long, P.strided(128))
    wide = torch.zeros(1, 1, fa4.AUTO_MIN_TOKENS, 128, dtype=torch.bfloat16)
    assert not fa4.auto_picks(wide, wide, P.fixed(128, 32))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fa4.auto_picks(long, long, P.fixed(128, 32))
    # auto asks fa4 first: where its test holds it wins, else the next backend
    monkeypatch.setitem(BACKENDS, "fa4", dataclasses.replace(BACKENDS["fa4"], auto_supports=lambda q, v, p: True))
    assert choose_backend(long, P.fixed(128, 32)) == "fa4"
    monkeypatch.setitem(BACKENDS, "fa4", dataclasses.replace(BACKENDS["fa4"], auto_supports=lambda q, v, p: False))
    assert choose_backend(long, P.fixed(128, 32)) == "torch"
