"""The Triton decode-step kernel (CPU interpreter, TRITON_INTERPRET=1) against a float64 softmax,
and the decoder on it against the full forward pass. GPU versions are in test_sampling.py."""

import importlib.util
import os

import pytest
import torch

from sparse_transformer.kvcache import Decoder
from sparse_transformer.sampling import generate
from test_sampling import CONTEXT, CUSTOM, naive_greedy, tiny_model
from tolerances import assert_close

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="no CUDA and TRITON_INTERPRET is not 1 (conftest sets it before triton loads)"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, kv, fixed_kv, index, moving_bias, fixed_bias, scale):
    """float64 softmax over the valid slots; zeros where a head has none."""
    b, h, dk = q.shape
    heads = torch.arange(h)[:, None]
    rows = torch.cat([kv[:, heads, index], fixed_kv[:, :, :fixed_bias.shape[-1]]], 2).double()  # (B, H, K, dk+dv)
    scores = torch.einsum("bhd,bhkd->bhk", q.double() * scale, rows[..., :dk])
    valid = torch.cat([moving_bias, fixed_bias], -1) == 0
    scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)  # a row of -inf only: zeros
    return torch.einsum("bhk,bhkd->bhd", weights, rows[..., dk:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("dk,dv", [(8, 8), (4, 12)])  # half-size keys; a width that is no power of two
def test_kernel_equals_float64_softmax(dtype, splits, dk, dv):
    from sparse_transformer.attention.triton_decode import decode_attention
    g = torch.Generator().manual_seed(splits * 100 + dk)
    b, h, context, k_moving, k_fixed = 2, 3, 50, 20, 37
    q = torch.randn(b, h, dk, generator=g).to(dtype)
    kv = torch.randn(b, h, context, dk + dv, generator=g).to(dtype)
    fixed_kv = torch.randn(b, h, k_fixed + 1, dk + dv, generator=g).to(dtype)  # one scratch row, never read
    index = torch.randint(0, context, (h, k_moving), generator=g)
    moving_valid = torch.rand(h, k_moving, generator=g) < 0.6
    fixed_valid = torch.rand(h, k_fixed, generator=g) < 0.4
    moving_valid[2], fixed_valid[2] = False, False  # head 2 has no valid slot: zeros
    fixed_valid[1, :] = False  # head 1: moving slots only
    bias = lambda valid: torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))  # noqa: E731
    args = [x.to(DEVICE) for x in (q, kv, fixed_kv, index, bias(moving_valid), bias(fixed_valid))]
    out = decode_attention(*args, 0.3, splits, torch.empty(b, h, dv, dtype=dtype, device=DEVICE))
    expected = reference(q, kv, fixed_kv, index, bias(moving_valid), bias(fixed_valid), 0.3)
    assert out.dtype == dtype and out.shape == (b, h, dv)
    assert_close(out.cpu(), expected, dtype)
    assert (out[:, 2] == 0).all()


@pytest.mark.parametrize("pattern,integration", [("strided", "merged"), ("fixed", "merged"), ("fixed", "split"),
                                                 ("dense", "interleaved"), ("custom", "merged")])
def test_triton_decoder_equals_full_forward(pattern, integration):
    model = (tiny_model(custom_pattern=CUSTOM) if pattern == "custom"
             else tiny_model(pattern, integration, half_qk=True)).to(DEVICE)
    tokens = torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    full = model(tokens)
    decoder = Decoder(model, 2, backend="triton")
    decoder.splits = [2] * len(decoder.splits)  # exercise the chunk merge, not only the one-chunk path
    decoder.prefill(tokens[:, :2])
    for t in range(2, CONTEXT):
        assert_close(decoder(tokens[:, t - 1], torch.tensor(t, device=DEVICE)), full[:, t])


def test_triton_greedy_generation_equals_rerunning_forward():
    model = tiny_model("fixed", "merged", seed=2)
    prime = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(4))
    out = generate(model.to(DEVICE), prime.to(DEVICE), CONTEXT - 4, temperature=0, backend="triton")
    assert torch.equal(out.cpu(), naive_greedy(model.cpu(), prime, CONTEXT - 4))


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        generate(tiny_model(), torch.zeros(1, 2, dtype=torch.long), 3, backend="cuda")
