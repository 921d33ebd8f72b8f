"""Random parts and unions with small parameters, and the issue's definitions written one pair at a
time: the brute force every test of parts compares with."""

import random

import torch

import sparse_transformer as st

P = st.patterns
LENGTHS = [1, 63, 64, 100, 257]


def rule(part, i: int, j: int, head: int) -> bool:
    """Issue 27's definition of each part (causality added by the caller), from its spec."""
    token, *args = part.spec.split(":")
    args = [int(a) for a in args]
    if token == "dense":
        return True
    if token == "local":
        return i - j < args[0]
    if token == "column":
        return (i - j) % args[0] == 0
    if token == "block":
        return i // args[0] == j // args[0]
    if token == "summary":
        stride, summary, distinct = (args + [1])[:3]
        u = head % distinct
        return stride - (u + 1) * summary <= j % stride < stride - u * summary
    if token == "global_tokens":
        return j < args[0]
    raise AssertionError(f"no brute force for {part.spec}")


def brute_force(pattern, n: int, head: int) -> torch.Tensor:
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            mask[i, j] = any(rule(p, i, j, head) for p in pattern.parts)
    return mask


def random_part(rng: random.Random, largest: int = 40):
    token = rng.choice(list(MAKERS))
    return MAKERS[token](rng, largest)


def _summary(rng, largest):
    stride = rng.randint(1, largest)
    summary = rng.randint(1, stride)
    return P.summary(stride, summary, rng.randint(1, stride // summary))


MAKERS = {
    "local": lambda rng, m: P.local(rng.randint(1, m)),
    "column": lambda rng, m: P.column(rng.randint(1, m)),
    "block": lambda rng, m: P.block(rng.randint(1, m)),
    "summary": _summary,
    "global_tokens": lambda rng, m: P.global_tokens(rng.randint(1, m)),
}


def random_unions(seed: int, count: int, most: int = 3, largest: int = 40):
    """``count`` unions of 1 to ``most`` random parts (a union may collapse to one part)."""
    rng = random.Random(seed)
    return [P.union(*(random_part(rng, largest) for _ in range(rng.randint(1, most)))) for _ in range(count)]
