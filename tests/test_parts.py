"""Parts and unions (issue 27): masks against the definitions, keys per query against a count of
the mask, costs at any length, spec strings, and the checks on every argument."""

import pytest
import torch

import sparse_transformer as st
from parts_cases import LENGTHS, brute_force, random_unions
from sparse_transformer.layout import cost, keys_per_query

P = st.patterns
UNIONS = random_unions(seed=0, count=30)


@pytest.mark.parametrize("pattern", UNIONS, ids=str)
def test_union_masks_match_the_definitions(pattern):
    for n in LENGTHS:
        for head in (0, 1, 3):
            assert torch.equal(pattern.mask(n, head=head), brute_force(pattern, n, head)), (n, head)


@pytest.mark.parametrize("pattern", UNIONS, ids=str)
def test_keys_per_query_and_cost_count_the_mask(pattern):
    for n in LENGTHS:
        for head in (0, 2):
            counted = pattern.mask(n, head=head).sum(-1)
            assert torch.equal(keys_per_query(pattern, n, head), counted)
            c = cost(pattern, n, head)
            assert c.pairs == int(counted.sum()) and c.max_keys_per_query == int(counted.max())


@pytest.mark.parametrize("pattern", random_unions(seed=1, count=40, largest=7), ids=str)
def test_union_cost_extends_past_the_counted_queries(pattern):
    """Small periods, N = 600: most queries come from the arithmetic series, not the mask."""
    counted = torch.cat([pattern.mask(600, head=1).sum(-1)])
    assert torch.equal(keys_per_query(pattern, 600, 1), counted)
    c = cost(pattern, 600, 1)
    assert (c.pairs, c.max_keys_per_query) == (int(counted.sum()), int(counted.max()))


def test_cost_at_any_length_is_closed_form():
    """n = 10^11 (the README's "any n"): Python ints, no O(n) tensor; against formulas written here."""
    n, l, c = 10 ** 11, 128, 32
    strided = cost(P.strided(l), n)
    # row: min(i+1, l); column: i // l + 1; they share j = i.
    row = l * (l + 1) // 2 + (n - l) * l
    q, r = divmod(n, l)
    column = n + l * q * (q - 1) // 2 + r * q
    assert strided.pairs == row + column - n and strided.max_keys_per_query == l + (n - 1) // l
    fixed = cost(P.fixed(l, c), n)
    # own block: i % l + 1; earlier blocks' summaries: (i // l) * c.
    assert fixed.pairs == q * l * (l + 1) // 2 + r * (r + 1) // 2 + c * (column - n)
    for part in (P.local(300), P.column(7), P.block(96), P.summary(128, 32, 4), P.dense()):
        assert cost(part, n, head=3).pairs > 0
    window = cost(P.local(256) | P.column(100), n)
    assert window.max_keys_per_query == 256 + (n - 1) // 100 - 2  # j = i and j = i - 200 counted once
    with pytest.raises(ValueError, match=r"n must be in \[0, 4,611,686,018,427,387,904\]"):
        cost(P.strided(8), 2 ** 63)


def test_union_cost_refuses_what_it_cannot_count_quickly():
    wide = P.column(4099) | P.block(4093)  # periods' lcm ~16.8M: too many queries to count
    assert cost(wide, 5000).pairs == int(wide.mask(5000).sum())
    with pytest.raises(ValueError, match="lcm of its parts' periods"):
        cost(wide, 10 ** 6)
    custom = P.custom(lambda b, h, q, k: q - k < 3, per_head=False)
    with pytest.raises(ValueError, match="n must be <= 16,384"):
        cost(custom, 10 ** 6)


def test_paper_patterns_are_unions_of_parts():
    assert P.strided(8) == P.union(P.local(8), P.column(8)) == P.local(8) | P.column(8)
    assert isinstance(P.union(P.column(8), P.local(8)), P.Strided)
    assert P.fixed(8, 2, 3) == P.block(8) | P.summary(8, 2, 3) and isinstance(P.block(8) | P.summary(8, 2, 3), P.Fixed)
    assert P.strided(8, "row") == P.local(8) and P.fixed(8, 2, part="summary") == P.summary(8, 2)
    assert P.union(P.local(5)) == P.local(5) and isinstance(P.union(P.local(5)), P.Local)
    for n in (1, 40, 100):
        for head in range(3):
            assert torch.equal(P.strided(8).mask(n, head), P.local(8).mask(n, head) | P.column(8).mask(n, head))
    assert P.strided(8).name == "strided_l8" and P.fixed(8, 2, 3).name == "fixed_l8_c2_v3"


def test_union_is_canonical():
    """Order, nesting and repeats do not matter; a part another contains is dropped."""
    a = P.union(P.column(4), P.local(3), P.summary(8, 2))
    assert a == P.summary(8, 2) | (P.local(3) | P.column(4)) == P.union(a, P.local(3))
    assert [p.token for p in a.parts] == ["local", "column", "summary"]
    assert P.local(3) | P.local(7) == P.local(7)
    assert P.column(3) | P.column(6) == P.column(3)  # every 6th is an every-3rd
    assert P.block(4) | P.block(8) == P.block(8)
    assert P.local(8) | P.block(8) == P.local(8)
    assert P.dense() | P.strided(4) == P.dense()
    assert len({P.strided(4), P.local(4) | P.column(4), P.parse("strided:4")}) == 1


@pytest.mark.parametrize("pattern", UNIONS + [P.strided(8), P.fixed(16, 4, 2), P.dense(), P.strided(8, "column"),
                                              P.fixed(8, 2, part="local")], ids=str)
def test_spec_round_trip(pattern):
    assert P.parse(pattern.spec) == pattern and hash(P.parse(pattern.spec)) == hash(pattern)
    assert P.parse(pattern.spec).spec == pattern.spec
    assert P.parse(pattern.spec) is P.parse(pattern.spec)  # cached


def test_spec_strings():
    assert P.parse("fixed:128:32:4") == P.fixed(128, 32, 4) and P.fixed(128, 32, 4).spec == "fixed:128:32:4"
    assert P.parse(" local : 5 + column:3 ") == P.local(5) | P.column(3)
    assert P.parse("summary:8:2:1") == P.summary(8, 2) and P.summary(8, 2).spec == "summary:8:2"
    assert P.strided(4).spec == "strided:4" and P.strided(4, "column").spec == "column:4"
    assert P.custom(lambda b, h, q, k: q == k).spec is None


@pytest.mark.parametrize("spec,message", [
    ("", "empty part"),
    ("local:3++column:2", "empty part"),
    ("banded:3", "unknown part 'banded'"),
    ("local", "'local' has 0 numbers, expected local:window"),
    ("local:3:4", "has 2 numbers"),
    ("local:x", "needs integer arguments"),
    ("local:0", r"window must be >= 1 and <= 2,147,483,647, got 0"),
    ("summary:8:9", r"summary must be in \[1, 8\], got 9"),
    ("fixed:8:4:3", r"distinct \* summary must be <= stride"),
    (5, "pattern spec must be a string"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        P.parse(spec)


@pytest.mark.parametrize("call,message", [
    (lambda: P.local(0), "window must be >= 1"),
    (lambda: P.local(-4), "window must be >= 1"),
    (lambda: P.column(0), "stride must be >= 1"),
    (lambda: P.block(0), "size must be >= 1"),
    (lambda: P.summary(8, 0), r"summary must be in \[1, 8\]"),
    (lambda: P.summary(8, 9), r"summary must be in \[1, 8\]"),
    (lambda: P.summary(8, 2, 0), "distinct must be >= 1"),
    (lambda: P.summary(8, 4, 3), r"distinct \* summary must be <= stride \(8\)"),
    (lambda: P.strided(2 ** 63), r"stride must be >= 1 and <= 2,147,483,647, got 9,223,372,036,854,775,808"),
    (lambda: P.strided(10 ** 30), r"stride must be >= 1 and <= 2,147,483,647"),
    (lambda: P.fixed(2 ** 31, 1), r"stride must be >= 1 and <= 2,147,483,647"),
    (lambda: P.local(True), "window must be an int"),
    (lambda: P.union(), "union needs at least one pattern"),
    (lambda: P.union(P.local(3), P.custom(lambda b, h, q, k: q == k)), "union argument 1 is a custom pattern"),
    (lambda: P.union(P.local(3), "column:4"), "union argument 1 must be a pattern"),
    (lambda: P.local(3) | P.custom(lambda b, h, q, k: q == k), "custom pattern"),
    (lambda: P.local(3).mask(4, head=-1), "head must be >= 0"),
])
def test_invalid_parts_and_unions(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_largest_parameters_give_the_mathematical_mask():
    """A stride past any sequence behaves as 'infinite', not as an overflowed int64."""
    huge = P.MAX_PARAMETER
    assert torch.equal(P.strided(huge).mask(50), P.dense().mask(50))  # the row reaches everything
    assert torch.equal(P.column(huge).mask(50), torch.eye(50, dtype=torch.bool))
    assert cost(P.strided(huge), 10 ** 9).max_keys_per_query == 10 ** 9
    assert cost(P.strided(huge), 10 ** 12).max_keys_per_query == huge + (10 ** 12 - 1) // huge


def test_a_part_with_only_a_mask_runs_where_its_forms_allow():
    """A part defines what it can; backends that need a form it lacks refuse it, and auto routes
    past them: the torch backend falls back to the mask function, triton refuses, the cache says why."""
    from dataclasses import dataclass
    from typing import ClassVar

    from sparse_transformer.attention import BACKENDS
    from sparse_transformer.kvcache import KeyPlan
    from tolerances import assert_close

    @dataclass(frozen=True, eq=False)
    class Sink(P.Part):  # the first `count` keys: global tokens, with none of the fast forms
        count: int
        token: ClassVar[str] = "sink"
        rank: ClassVar[int] = 5

        @property
        def arguments(self):
            return (self.count,)

        def allowed(self, b, h, q_idx, kv_idx):
            return kv_idx < self.count

        def admits_diagonal(self):
            return False

        def structure(self):
            return 1, 0, self.count

    pattern = P.local(4) | Sink(3)
    assert torch.equal(pattern.mask(20), (P.local(4) | P.global_tokens(3)).mask(20))
    assert cost(pattern, 10 ** 9).pairs == cost(P.local(4) | P.global_tokens(3), 10 ** 9).pairs
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    assert_close(st.sparse_attention(q, k, v, pattern), st.sparse_attention(q, k, v, pattern, backend="reference"))
    assert not BACKENDS["triton"].supports(q.half(), v.half(), pattern)
    with pytest.raises(ValueError, match="has no cache slots"):
        KeyPlan([pattern], 2, 16)
