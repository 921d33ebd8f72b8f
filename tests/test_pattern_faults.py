"""Faults found by a hunt on the pattern API and the `patterns` command: bad input is one ValueError
line naming the argument, never a TypeError or a hang; unusual unions match the float64 reference."""

import importlib.util
import os

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.cli import main
from test_triton import check_against_reference
from tolerances import assert_close, assert_close_norm

P = st.patterns


@pytest.mark.parametrize("spec", [["local:4"], {"local:4"}, {"local": 4}])
def test_parse_of_an_unhashable_spec_is_a_value_error(spec):
    # Was: TypeError "unhashable type" from the parse cache, before the type check ran.
    with pytest.raises(ValueError, match="pattern spec must be a string"):
        P.parse(spec)


@pytest.mark.parametrize("other", [3, None, "column:4"])
def test_a_non_pattern_on_the_left_of_or_is_a_value_error(other):
    # Was: TypeError "unsupported operand type(s) for |" (only `pattern | 3` gave the one-line error).
    with pytest.raises(ValueError, match="union argument 0 must be a pattern"):
        other | P.local(4)


@pytest.mark.parametrize("value", ["local:4", None, [P.local(4)]])
def test_parts_of_a_non_pattern_is_a_value_error(value):
    # Was: AttributeError "'str' object has no attribute 'spec'".
    with pytest.raises(ValueError, match="pattern must be a pattern from st.patterns"):
        P.parts(value)


def test_a_distinct_count_past_any_head_count_is_refused_and_the_largest_plans_at_once():
    # Was: accepted; the triton backend's plan then built one offset per group (10**9 of them: a hang and
    # gigabytes of memory before the first launch).
    with pytest.raises(ValueError, match=r"distinct must be <= 4,096"):
        P.summary(P.MAX_PARAMETER, 1, 10 ** 9)
    with pytest.raises(ValueError, match=r"distinct must be <= 4,096"):
        P.parse("fixed:2147483647:1:4097")
    part = P.summary(P.MAX_PARAMETER, 1, 4096)  # the largest count plans one offset per group
    assert len(part.kernel(100, ()).offsets) == 4096


def test_a_spec_number_too_long_to_be_a_size_says_so():
    # Was: "'local:99...' needs integer arguments", for a number that is an integer.
    with pytest.raises(ValueError, match=r"at most 30 digits \(sizes are at most 2,147,483,647\)"):
        P.parse("local:" + "9" * 40)


@pytest.mark.parametrize("spec,term,message", [
    ("local:4+summary:4:2:3", "summary:4:2:3", r"distinct \* summary must be <= stride"),
    ("global_tokens:2+local:0", "local:0", "window must be >= 1"),
    ("strided:8+fixed:8:9", "fixed:8:9", r"summary must be in \[1, 8\]"),
])
def test_a_size_out_of_range_names_its_part_of_the_spec(spec, term, message):
    # Was: only the part's own message, without saying which term of a longer spec held it.
    with pytest.raises(ValueError, match=message) as info:
        P.parse(spec)
    assert f"{term!r}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--pattern", "local:4", "--stride", "7"], "--stride has no effect on --pattern local:4"),
    (["--pattern", "local:4+global_tokens:2", "--summary", "2", "--distinct", "2"],
     "--summary and --distinct have no effect"),
    (["--pattern", "strided", "--summary", "2"], "--summary has no effect on --pattern strided"),
    (["--pattern", "dense", "--stride", "8"], "--stride has no effect on --pattern dense"),
])
def test_patterns_refuses_a_size_flag_its_pattern_ignores(argv, message, capsys):
    # Was: the flag silently dropped (the config refuses model.stride next to a spec; the command did not).
    assert main(["patterns", *argv, "--n", "16"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == "" and len(captured.err.strip().splitlines()) == 1


def test_patterns_still_takes_the_sizes_its_pattern_uses(capsys):
    assert main(["patterns", "--pattern", "fixed", "--stride", "6", "--summary", "2", "--distinct", "2",
                 "--n", "36"]) == 0
    assert main(["patterns", "--pattern", "strided", "--stride", "6", "--n", "36"]) == 0
    assert main(["patterns", "--pattern", "local:6+column:8", "--n", "48"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--n", "16", "--query", "16"], r"--query must be in [0, 15]"),
    (["--n", "16", "--query", "-1"], r"--query must be in [0, 15]"),
    (["--n", str(2 ** 63)], "n must be in [0, 4,611,686,018,427,387,904]"),
])
def test_patterns_checks_n_and_query_before_printing_anything(argv, message, capsys):
    # Was: the cost printed first, then the error; without --out an out-of-range --query was accepted
    # silently, and with it the error named `query`, not the flag.
    assert main(["patterns", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


# Unions at the edges of their sizes (none of these failed; they pin the behaviour the hunt checked).
EDGES = [
    (P.local(500) | P.global_tokens(2), 37),          # a window longer than N
    (P.global_tokens(40) | P.column(3), 37),          # every key a global token
    (P.block(1) | P.summary(5, 2, 2), 37),            # blocks of one position
    (P.column(1) | P.local(3), 37),                   # column stride 1: dense
    (P.union(P.local(4), P.local(4), P.column(4)), 37),  # a duplicate part
    (P.global_tokens(1) | P.block(10 ** 6) | P.column(P.MAX_PARAMETER), 70),
]


@pytest.mark.parametrize("pattern,n", EDGES, ids=lambda x: str(x))
def test_torch_backend_on_unions_at_the_edges(pattern, n):
    check_against_reference("torch", pattern, (1, 3, n, 8), torch.float32, seed=n, compare=assert_close)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors need the Triton interpreter")
@pytest.mark.parametrize("pattern,n", EDGES[:3], ids=lambda x: str(x))
def test_triton_on_unions_at_the_edges(pattern, n):
    check_against_reference("triton", pattern, (1, 2, n, 16), torch.float16, seed=n, compare=assert_close_norm)


def test_cost_of_a_non_pattern_is_a_value_error():
    """layout.cost("local:4", 10) raised AttributeError ('str' object has no attribute 'pairs')."""
    with pytest.raises(ValueError, match="pattern must be a pattern from st.patterns.*got str 'local:4'"):
        st.layout.cost("local:4", 10)
    assert st.layout.cost(st.patterns.parse("local:4"), 10).pairs == 1 + 2 + 3 + 4 * 7


def test_a_huge_or_long_argument_keeps_the_error_one_short_line():
    """P.local(10**100) printed all 101 digits; a long non-int argument printed its whole repr."""
    with pytest.raises(ValueError) as info:
        P.local(10 ** 100)
    assert str(info.value) == "window must be >= 1 and <= 2,147,483,647, got an integer of 101 digits"
    with pytest.raises(ValueError) as info:
        P.column("8" * 500)
    assert str(info.value).startswith("stride must be an int, got str '888") and len(str(info.value)) < 120
    with pytest.raises(ValueError, match="got -5$"):
        P.block(-5)
