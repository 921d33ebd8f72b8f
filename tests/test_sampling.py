"""Sampling with the sparse key/value cache: exact against the full forward pass, O(keys) index sets."""

import itertools

import pytest
import torch

from sparse_transformer.config import ModelConfig
from sparse_transformer.kvcache import Decoder, KeyPlan
from sparse_transformer.layout import keys_per_query
from sparse_transformer.model import SparseTransformer
from sparse_transformer.patterns import custom, dense, fixed, strided
from sparse_transformer.sampling import filter_logits, generate, sample_next
from tolerances import assert_close, assert_close_norm

CONTEXT = 37  # not a multiple of the stride: partial last row / block


def tiny_model(pattern="fixed", integration="merged", seed=0, custom_pattern=None, **kw) -> SparseTransformer:
    """Random weights everywhere (the paper's zero logit projection would make every logit equal)."""
    torch.manual_seed(seed)
    options = dict(n_layer=3, n_head=4, d_model=32, context=CONTEXT, pattern=pattern, stride=6, summary=2,
                   distinct=2, integration=integration)
    options.update(kw)
    model = SparseTransformer(ModelConfig(**options), pattern=custom_pattern)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def naive_greedy(model, prime, steps):
    """Greedy decoding re-running the full forward pass for every new byte."""
    out = prime
    for _ in range(steps):
        logits = model(torch.cat([out, out.new_zeros(out.shape[0], 1)], 1))[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out


def cache_matches_rerunning(model, tokens, prefill: int, prime: int, steps: int) -> None:
    """Cached logits after a prefill of ``prefill`` bytes equal the full forward pass at every later
    position, and greedy bytes after ``prime`` bytes equal re-running the model for each byte."""
    full = model(tokens)
    decoder = Decoder(model, tokens.shape[0])
    decoder.prefill(tokens[:, :prefill])
    for t in range(prefill, tokens.shape[1]):
        assert_close(decoder(tokens[:, t - 1], torch.tensor(t)), full[:, t])
    start = tokens[:, :prime]
    assert torch.equal(generate(model, start, steps, temperature=0), naive_greedy(model, start, steps))


MODES = list(itertools.product(["dense", "strided", "fixed"], ["merged", "interleaved", "split"]))


def sliding_window(b, h, q, k):
    return (q - k < 5) | (k % 7 == 0)


CUSTOM = custom(sliding_window, per_head=False)


@pytest.mark.parametrize("pattern", [dense(), strided(6), strided(6, "row"), strided(6, "column"), fixed(6, 2, 2),
                                     fixed(6, 2, 2, "local"), fixed(6, 2, 2, "summary"), fixed(6, 3), CUSTOM],
                         ids=str)
def test_key_plan_is_the_pattern_row(pattern):
    heads = 4
    plan = KeyPlan([pattern], heads, CONTEXT)
    for t in range(CONTEXT):
        for h, chosen in enumerate(plan.keys(t)):
            assert len(set(chosen)) == len(chosen), "a key is read twice"
            assert chosen == pattern.mask(CONTEXT, head=h)[t].nonzero().flatten().tolist(), (t, h)
    # Only dense and custom patterns read the whole cache.
    assert plan.whole_cache == (pattern.kind in ("dense", "custom"))


@pytest.mark.parametrize("pattern", [strided(32), strided(32, "row"), strided(32, "column"), fixed(32, 4, 4),
                                     fixed(32, 4, 4, "local"), fixed(32, 4, 4, "summary")], ids=str)
def test_key_plan_reads_o_keys_per_query(pattern):
    """The static slot count is the pattern's largest keys-per-query (up to one block), not the context."""
    n = 1024
    plan = KeyPlan([pattern], 4, n)
    most = max(int(keys_per_query(pattern, n, head=h).max()) for h in range(4))
    assert most <= plan.moving + plan.fixed <= most + 32
    assert plan.moving + plan.fixed < n // 4


def test_split_heads_use_their_group_and_local_head_number():
    """Split heads: heads 0-1 use the local part, 2-3 the summary part numbered from 0 within the group."""
    local, summary = fixed(6, 2, 2, "local"), fixed(6, 2, 2, "summary")
    plan = KeyPlan([local, summary], 4, CONTEXT)
    keys = plan.keys(30)
    for h, (pattern, head) in enumerate([(local, 0), (local, 1), (summary, 0), (summary, 1)]):
        assert keys[h] == pattern.mask(CONTEXT, head=head)[30].nonzero().flatten().tolist()


@pytest.mark.parametrize("pattern,integration", MODES)
@pytest.mark.parametrize("prime", [0, 7])
def test_cached_logits_equal_full_forward(pattern, integration, prime):
    model = tiny_model(pattern, integration, half_qk=(prime == 7), interleave_ratio=2 if prime else 1)
    tokens = torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    decoder = Decoder(model, 2)
    pre = decoder.prefill(tokens[:, :prime + 1])
    assert_close(pre, full[:, :prime + 1])
    for t in range(prime + 1, CONTEXT):
        assert_close(decoder(tokens[:, t - 1], torch.tensor(t)), full[:, t])


@pytest.mark.parametrize("pattern,integration", MODES)
def test_cached_greedy_generation_equals_rerunning_forward(pattern, integration):
    model = tiny_model(pattern, integration, seed=2)
    for p in (0, 4):
        prime = torch.randint(0, 256, (3, p), generator=torch.Generator().manual_seed(p))
        steps = CONTEXT - p
        out = generate(model, prime, steps, temperature=0)
        assert out.shape == (3, CONTEXT) and out.dtype == torch.long
        assert torch.equal(out[:, :p], prime)
        assert torch.equal(out, naive_greedy(model, prime, steps))


@pytest.mark.parametrize("integration", ["interleaved", "split"])
def test_a_layer_whose_summary_slots_lie_past_the_context(integration):
    """Fixed l = 16, c = 2 at context 13: the summary part has no key anywhere (its layer or heads
    output zeros in the full forward pass); the cache must do the same, not fail."""
    model = tiny_model("fixed", integration, context=13, stride=16, summary=2, distinct=1, seed=4)
    prime = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(model, prime, 10, temperature=0), naive_greedy(model, prime, 10))


def test_generate_gives_every_submodule_its_mode_back():
    model = tiny_model("strided").train()
    model.blocks[0].eval()  # a user's frozen block stays frozen
    generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def test_custom_pattern_falls_back_to_its_mask_function():
    model = tiny_model(custom_pattern=CUSTOM, seed=3)
    tokens = torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    cache_matches_rerunning(model, tokens, prefill=1, prime=3, steps=20)


def test_sampling_options():
    model = tiny_model(seed=4)
    prime = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prime, 12, temperature=0)
    assert torch.equal(generate(model, prime, 12, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(generate(model, prime, 12, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)
    a = generate(model, prime, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, prime, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    c = generate(model, prime, 12, temperature=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :3], prime)
    assert torch.equal(generate(model, prime, 0), prime)
    model.train()
    generate(model, prime, 2)
    assert model.training, "generate must restore training mode"


def test_filters_and_temperature():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, False, True, False, False]]
    probs = torch.softmax(logits, -1)[0]  # 0.636, 0.086, 0.234, 0.032, 0.012
    nucleus = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert nucleus.tolist() == [[True, False, True, False, False]]  # 0.636 < 0.8 <= 0.636 + 0.234
    assert torch.isfinite(filter_logits(logits, top_p=float(probs[0]) - 1e-3)).sum() == 1
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()
    # Draws follow softmax(logits / T).
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        draws = sample_next(logits.expand(20000, -1), temperature, generator=g)
        freq = torch.bincount(draws, minlength=5).float() / 20000
        assert torch.allclose(freq, torch.softmax(logits[0] / temperature, -1), atol=0.015)
    assert sample_next(logits, 0).tolist() == [0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(prime=torch.zeros(3, dtype=torch.long)), "2-D LongTensor"),
    (dict(prime=torch.zeros(1, 2, dtype=torch.int32)), "2-D LongTensor"),
    (dict(prime=torch.full((1, 2), 256)), "bytes in"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(steps=CONTEXT), "<= the model's context"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=True), "top_p"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(compile="fast"), "compile"),
])
def test_bad_arguments(kwargs, message):
    model = tiny_model(seed=5)
    args = dict(prime=torch.zeros(1, 2, dtype=torch.long), steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, **args)


def test_cache_size_is_what_was_allocated():
    # keys: qk width 16 (4 per head), values: d 32 (8 per head); 3 layers, 5 sequences, fp32
    assert Decoder(tiny_model("strided", half_qk=True), 5).cache_bytes() == 3 * 5 * CONTEXT * (16 + 32) * 4
    # fixed l=6 c=2: 6 whole blocks before position 37, so 12 summary slots per head + 1 scratch, fp32 copies
    compact = 3 * 5 * 4 * (12 + 1) * (4 + 8) * 4
    assert Decoder(tiny_model("fixed", half_qk=True), 5).cache_bytes() == 3 * 5 * CONTEXT * (16 + 32) * 4 + compact


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("compile", [True, "cudagraph"])
@pytest.mark.parametrize("pattern,integration", [("strided", "merged"), ("fixed", "split")])
def test_compiled_step_on_gpu_equals_eager(compile, pattern, integration, backend):
    model = tiny_model(pattern, integration, seed=6).cuda()
    prime = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(6)).cuda()
    eager = generate(model, prime, CONTEXT - 4, temperature=0, compile=False, backend=backend)
    assert torch.equal(generate(model, prime, CONTEXT - 4, temperature=0, compile=compile, backend=backend), eager)
    assert torch.equal(eager.cpu(), naive_greedy(model.cpu(), prime.cpu(), CONTEXT - 4))
    g = lambda: torch.Generator(device="cuda").manual_seed(0)  # noqa: E731
    model.cuda()
    assert torch.equal(generate(model, prime, 20, generator=g(), compile=compile, backend=backend),
                       generate(model, prime, 20, generator=g(), compile=False, backend=backend))


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["fixed", "strided"])
def test_triton_decode_step_at_paper_shapes_on_gpu(pattern):
    """bf16, 8 heads of 64, stride 128: the Triton step's logits against the PyTorch step's and
    against the full forward pass, over the first two blocks and the last positions."""
    config = dict(n_layer=2, n_head=8, d_model=512, context=2048, stride=128, summary=32, distinct=4)
    model = tiny_model(pattern, "merged", seed=7, **config).cuda().bfloat16()
    tokens = torch.randint(0, 256, (8, 2048), generator=torch.Generator().manual_seed(7)).cuda()
    full = model(tokens).float()
    decoders = [Decoder(model, 8, backend) for backend in ("triton", "torch")]

    def compare(t):
        fast, slow = (d(tokens[:, t - 1], torch.tensor(t, device="cuda")).float() for d in decoders)
        # bf16 activations: logits of size ~40 differ by an ulp (0.25) between any two computation
        # orders, so compare as the kernel tests do, by relative norm.
        assert_close_norm(fast, slow, torch.bfloat16)
        assert_close_norm(fast, full[:, t], torch.bfloat16)

    for t in range(1, 260, 7):  # a fresh prefill before each: block edges of the first blocks
        for decoder in decoders:
            decoder.prefill(tokens[:, :t])
        compare(t)
    for decoder in decoders:
        decoder.prefill(tokens[:, :1800])
    for t in range(1800, 2048):  # consecutive steps: each reads the rows the previous ones wrote
        compare(t)


UNIONS = ["local:5+column:6", "local:4+block:6+summary:6:2:2", "column:3+column:4+summary:8:2",
          "block:4+block:6+local:3"]


@pytest.mark.parametrize("spec", UNIONS)
def test_key_plan_of_a_union_reads_each_key_once(spec):
    from sparse_transformer.patterns import parse
    pattern = parse(spec)
    plan = KeyPlan([pattern], 4, CONTEXT)
    for t in range(CONTEXT):
        for h, chosen in enumerate(plan.keys(t)):
            assert len(set(chosen)) == len(chosen), "a key is read twice"
            assert chosen == pattern.mask(CONTEXT, head=h)[t].nonzero().flatten().tolist(), (t, h)


@pytest.mark.parametrize("spec", UNIONS)
@pytest.mark.parametrize("integration", ["merged", "interleaved", "split"])
def test_cache_of_a_union_equals_rerunning(spec, integration):
    """The issue's check: the KV cache against re-running the full forward pass, for unions."""
    model = tiny_model(spec, integration, seed=8, n_head=4, d_model=48, half_qk=True)
    tokens = torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(8))
    cache_matches_rerunning(model, tokens, prefill=3, prime=2, steps=CONTEXT - 2)


def test_decoder_runs_the_models_own_blocks(monkeypatch):
    """A decode step goes through Block.forward and Attention.forward (no copy of the block's math)."""
    from sparse_transformer import model as model_module
    model = tiny_model("fixed", seed=9)
    calls = []
    original = model_module.Block.forward

    def counting(self, x, cache=None):
        calls.append(cache is not None)
        return original(self, x, cache)

    monkeypatch.setattr(model_module.Block, "forward", counting)
    decoder = Decoder(model, 1)
    decoder.prefill(torch.zeros(1, 2, dtype=torch.long))
    decoder(torch.zeros(1, dtype=torch.long), torch.tensor(2))
    assert calls == [True] * 6  # prefill and one step, three blocks each


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("spec", ["local:5+column:6", "global_tokens:3+local:4+summary:6:2:2"])
def test_union_decoding_on_gpu_with_cuda_graphs(spec, backend):
    model = tiny_model(spec, "merged", seed=10).cuda()
    prime = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(10)).cuda()
    graphed = generate(model, prime, CONTEXT - 4, temperature=0, compile="cudagraph", backend=backend)
    assert torch.equal(graphed, generate(model, prime, CONTEXT - 4, temperature=0, compile=False, backend=backend))
    assert torch.equal(graphed.cpu(), naive_greedy(model.cpu(), prime.cpu(), CONTEXT - 4))
