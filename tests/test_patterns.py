"""Every pattern and part against a brute-force loop over the definitions (issue: core)."""

import random

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.layout import block_layout, cost, keys_per_query


def brute_force(kind, n, head, stride=None, summary=None, distinct=1, part=None):
    """The definitions from the issue, one (i, j) at a time."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            if kind == "dense":
                ok = True
            elif kind == "strided":
                row, col = 0 <= i - j < stride, (i - j) % stride == 0
                ok = {"row": row, "column": col, None: row or col}[part]
            else:
                u = head % distinct
                local = i // stride == j // stride
                summ = stride - (u + 1) * summary <= j % stride < stride - u * summary
                ok = {"local": local, "summary": summ, None: local or summ}[part]
            mask[i, j] = ok
    return mask


def random_cases(seed, count):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        n = rng.randint(1, 70)
        stride = rng.randint(1, 80)
        summary = rng.randint(1, stride)
        distinct = rng.randint(1, stride // summary)
        cases.append((n, stride, summary, distinct, rng.choice([None, "row", "column"]),
                      rng.choice([None, "local", "summary"]), rng.randint(0, 5)))
    return cases


@pytest.mark.parametrize("n,stride,summary,distinct,spart,fpart,head", random_cases(0, 40))
def test_masks_match_definitions(n, stride, summary, distinct, spart, fpart, head):
    assert torch.equal(st.patterns.dense().mask(n, head=head), brute_force("dense", n, head))
    assert torch.equal(st.patterns.strided(stride, spart).mask(n, head=head),
                       brute_force("strided", n, head, stride, part=spart))
    pattern = st.patterns.fixed(stride, summary, distinct, fpart)
    assert torch.equal(pattern.mask(n, head=head), brute_force("fixed", n, head, stride, summary, distinct, fpart))


def test_mask_shape_dtype_and_causality():
    m = st.patterns.strided(3).mask(10)
    assert m.shape == (10, 10) and m.dtype == torch.bool
    assert not m.triu(1).any() and m.diagonal().all()


def test_distinct_heads_use_different_summary_blocks():
    p = st.patterns.fixed(8, 2, distinct=3, part="summary")
    masks = [p.mask(32, head=h) for h in range(4)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert torch.equal(masks[0], masks[3])  # head 3 uses sub-block 3 % 3 = 0
    assert p.heads_differ() and not st.patterns.fixed(8, 2, distinct=3, part="local").heads_differ()


@pytest.mark.parametrize("n,stride,summary,distinct,spart,fpart,head", random_cases(1, 20))
def test_keys_per_query_closed_forms(n, stride, summary, distinct, spart, fpart, head):
    for p in (st.patterns.dense(), st.patterns.strided(stride, spart), st.patterns.fixed(stride, summary, distinct, fpart)):
        assert torch.equal(keys_per_query(p, n, head), p.mask(n, head=head).sum(-1)), p.name


def test_cost_at_long_length_is_cheap_and_right():
    c = cost(st.patterns.strided(128), 65536)
    # row: min(i+1, 128); column: i // 128 + 1; shared key j = i.
    i = torch.arange(65536)
    expected = int((torch.clamp(i + 1, max=128) + i // 128).sum())
    assert c.pairs == expected and c.max_keys_per_query == 127 + 512
    assert c.density < 0.01


def test_custom_pattern_from_mask_mod():
    def sliding(b, h, q, k):
        return q - k < 3
    p = st.patterns.custom(sliding, per_head=False)
    assert p.name == "sliding"
    assert torch.equal(p.mask(9), brute_force("strided", 9, 0, 3, part="row"))
    assert torch.equal(keys_per_query(p, 9), p.mask(9).sum(-1))


def test_custom_pattern_must_return_bool():
    p = st.patterns.custom(lambda b, h, q, k: q - k)
    with pytest.raises(ValueError, match="bool tensor"):
        p.mask(4)
    with pytest.raises(ValueError, match="callable"):
        st.patterns.custom(42)


def test_custom_pattern_must_be_elementwise_with_four_arguments():
    fixed_size = st.patterns.custom(lambda b, h, q, k: torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"elementwise.*broadcasting to \(4, 4\) it returned shape \(3,\)"):
        fixed_size.mask(4)
    flattened = st.patterns.custom(lambda b, h, q, k: (q >= k).flatten())
    with pytest.raises(ValueError, match=r"returned shape \(16,\)"):
        flattened.mask(4)
    assert st.patterns.custom(lambda b, h, q, k: torch.tensor(True)).mask(3).sum() == 6  # a scalar broadcasts
    with pytest.raises(ValueError, match=r"must take four arguments \(b, h, q_idx, kv_idx\)"):
        st.patterns.custom(lambda q, k: q >= k)
    assert st.patterns.custom(lambda *idx: idx[2] >= idx[3]).mask(2).sum() == 3


@pytest.mark.parametrize("n,block", [(37, 8), (64, 16), (5, 8)])
def test_block_layout_derived_from_mask(n, block):
    p = st.patterns.fixed(6, 2, distinct=2)
    for head in (0, 1):
        m = torch.nn.functional.pad(p.mask(n, head=head), (0, -n % block, 0, -n % block))
        nb = m.shape[0] // block
        expected = m.view(nb, block, nb, block).any(3).any(1)
        assert torch.equal(block_layout(p, n, block, head), expected)


@pytest.mark.parametrize("call,message", [
    (lambda: st.patterns.strided(0), "stride must be >= 1"),
    (lambda: st.patterns.fixed(0, 1), "stride must be >= 1"),
    (lambda: st.patterns.fixed(8, 0), r"summary must be in \[1, 8\]"),
    (lambda: st.patterns.fixed(8, 9), r"summary must be in \[1, 8\]"),
    (lambda: st.patterns.fixed(8, 4, distinct=3), "distinct \\* summary must be <= stride"),
    (lambda: st.patterns.fixed(8, 4, distinct=0), "distinct must be >= 1"),
    (lambda: st.patterns.strided(4, part="local"), "part must be None, 'row' or 'column'"),
    (lambda: st.patterns.fixed(4, 1, part="row"), "part must be None, 'local' or 'summary'"),
    (lambda: st.patterns.strided(2.5), "stride must be an int"),
    (lambda: st.patterns.by_name("banded"), "pattern must be one of"),
    (lambda: st.patterns.dense().mask(-1), "n must be >= 0"),
])
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_parts_union_is_the_merged_pattern():
    for merged in (st.patterns.strided(5), st.patterns.fixed(6, 2, 3)):
        parts = st.patterns.parts(merged)
        assert len(parts) == 2
        for head in range(3):
            union = parts[0].mask(40, head=head) | parts[1].mask(40, head=head)
            assert torch.equal(union, merged.mask(40, head=head))


def test_spec_numbers_are_plain_ascii_digits():
    """int() would read '4_0' as 40 and other scripts' digits as numbers: a spec takes 0-9 only."""
    from sparse_transformer.patterns import parse

    for spec in ("local:4_0", "local:\u0663", "local: 4e2", "local:" + "9" * 5000):
        with pytest.raises(ValueError, match="needs integer arguments"):
            parse(spec)
    assert parse("local:40").spec == "local:40"
