"""GPU checks of the triton and flex backends (`pytest -m gpu` on a CUDA machine; skipped elsewhere).

Up to N = 4,099 against the float64 reference; at N = 65,536 against the portable backend on
fp32 copies of the inputs (the reference's N x N matrix would need 32 GiB per head there).
"""

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.attention import BACKENDS, choose_backend
from tolerances import assert_close, assert_close_norm

P = st.patterns
pytestmark = pytest.mark.gpu


def run(backend, pattern, q, k, v, grad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = BACKENDS[backend].load()(q, k, v, pattern, q.shape[-1] ** -0.5)
    out.backward(grad.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def inputs(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad = (torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(4))
    return q, k, v, grad


BUILT_IN = [P.dense(), P.strided(128), P.strided(128, "row"), P.strided(128, "column"), P.strided(37),
            P.fixed(128, 32), P.fixed(128, 32, distinct=4), P.fixed(128, 32, part="summary"),
            P.fixed(64, 16, distinct=2, part="local"), P.strided(5000)]
# Unions of parts (issue 27): the benchmark's two, then overlaps excluded by DMIN and by position tests.
UNIONS = [P.local(512) | P.global_tokens(64), P.local(128) | P.column(128) | P.global_tokens(16),
          P.local(300) | P.column(100), P.block(64) | P.summary(128, 16, 4) | P.global_tokens(7),
          P.local(64) | P.block(96) | P.column(33)]


@pytest.mark.parametrize("pattern", BUILT_IN + UNIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_against_reference(pattern, dtype):
    q, k, v, grad = inputs((2, 2, 4099, 64), dtype, seed=1)
    got = run("triton", pattern, q, k, v, grad)
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    for a, b in zip(got, want):
        assert_close_norm(a, b, dtype)


@pytest.mark.parametrize("pattern,n", [(P.strided(128), 4096), (P.strided(128, "column"), 4096),
                                       (P.strided(256), 4096), (P.strided(64), 1984)], ids=str)
def test_triton_packed_short_columns(pattern, n):
    """Columns of at most 32 rows (N / stride), packed several to a tile, against the reference."""
    from sparse_transformer.attention.triton_sparse import plan

    assert plan(pattern, n)[-1].packed
    q, k, v, grad = inputs((2, 2, n, 64), torch.bfloat16, seed=5)
    got = run("triton", pattern, q, k, v, grad)
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    for a, b in zip(got, want):
        assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("pattern", [P.strided(128), P.fixed(128, 32, distinct=4)], ids=str)
def test_triton_repeated_calls_launch_directly(pattern):
    """After a shape's first call the kernels skip the JIT (``triton_launch.Launcher``): the same
    inputs give the same bits, new inputs and inputs that are not 16-byte aligned (a new key, so
    a kernel of their own) match the reference."""
    from sparse_transformer.attention import triton_kernels as tk
    from sparse_transformer.attention.triton_sparse import _launcher

    q, k, v, grad = inputs((2, 2, 1000, 64), torch.bfloat16, seed=7)
    first = run("triton", pattern, q, k, v, grad)
    again = run("triton", pattern, q, k, v, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    launchers = (_launcher(kernel) for kernel in (tk._fwd_kernel, tk._dq_kernel, tk._dkdv_kernel))
    assert all(any(entry is not None for entry in x._compiled.values()) for x in launchers)
    fresh = inputs((2, 2, 1000, 64), torch.bfloat16, seed=8)
    storage = [torch.empty(fresh[0].numel() + 1, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    unaligned = [s[1:].view_as(x).copy_(x) for s, x in zip(storage, fresh)]
    for q, k, v, grad in (fresh, unaligned):
        got = run("triton", pattern, q, k, v, grad)
        want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
        for a, b in zip(got, want):
            assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("pattern", [P.strided(128), P.fixed(128, 32, distinct=4)], ids=str)
def test_triton_backward_tile_shapes_of_the_tutorial(pattern):
    """32x128 dK/dV and 128x32 dQ tiles (the shapes the benchmark sweeps) give the same gradients."""
    from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention

    config = KernelConfig(dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3))
    q, k, v, grad = inputs((2, 2, 4099, 64), torch.bfloat16, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = triton_attention(q, k, v, pattern, 64 ** -0.5, config)
    out.backward(grad)
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    for a, b in zip([out, q.grad, k.grad, v.grad], want):
        assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("pattern", [P.strided(128), P.fixed(128, 32, distinct=4), P.dense(), UNIONS[0]], ids=str)
def test_triton_loads_through_descriptors_or_pointers(pattern, tma):
    """N = 4,096, whole blocks, so every view fits a tensor descriptor: both load paths, forced,
    against the reference (the default picks per launch)."""
    from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention

    q, k, v, grad = inputs((1, 2, 4096, 64), torch.bfloat16, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = triton_attention(q, k, v, pattern, 64 ** -0.5, KernelConfig(tma=tma))
    out.backward(grad)
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    for a, b in zip([out, q.grad, k.grad, v.grad], want):
        assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("d", [32, 128])
def test_triton_head_dims(d):
    q, k, v, grad = inputs((1, 3, 1500, d), torch.bfloat16, seed=d)
    for pattern in (P.strided(64), P.fixed(64, 16, distinct=3)):
        got = run("triton", pattern, q, k, v, grad)
        want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
        for a, b in zip(got, want):
            assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("pattern", [P.strided(128), P.fixed(128, 32), P.fixed(128, 16, distinct=2)] + UNIONS[:2],
                         ids=str)
def test_triton_at_65536_against_portable_fp32(pattern):
    q, k, v, grad = inputs((1, 2, 65536, 64), torch.bfloat16, seed=7)
    got = run("triton", pattern, q, k, v, grad)
    want = run("torch", pattern, q.float(), k.float(), v.float(), grad.float())
    for a, b in zip(got, want):
        assert_close_norm(a, b, torch.bfloat16)


@pytest.mark.parametrize("pattern", [
    P.custom(lambda b, h, q, k: (q - k) % 3 == 0, "every_third", per_head=False),
    P.custom(lambda b, h, q, k: (k % 64 == h % 4) | (q - k < 32), "per_head_columns"),
    P.strided(64),
], ids=str)
def test_flex_against_reference(pattern):
    q, k, v, grad = inputs((1, 4, 1000, 64), torch.float32, seed=3)
    got = run("flex", pattern, q, k, v, grad)
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    for a, b in zip(got, want):
        assert_close_norm(a, b, torch.float32)


def test_auto_on_cuda():
    q = torch.zeros(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_backend(q, P.strided(8)) == "triton"
    assert choose_backend(q, P.custom(lambda b, h, i, j: i == j, per_head=False)) == "flex"
    assert choose_backend(q.float(), P.strided(8)) == "flex"


def test_one_million_tokens_forward_backward():
    """B=1, H=8, D=64, N = 1,048,576: runs, finite, memory linear in N (no N x N anywhere)."""
    n = 1 << 20
    q, k, v, grad = inputs((1, 8, n, 64), torch.bfloat16, seed=0)
    torch.cuda.reset_peak_memory_stats()
    got = run("triton", P.strided(1024), q, k, v, grad)
    assert all(torch.isfinite(x).all() for x in got)
    # q, k, v, dO, out, dq, dk, dv: 1 GiB each in bf16; fp32 partial output 2 GiB; lse, delta 64 MiB
    assert torch.cuda.max_memory_allocated() < 12 * 2 ** 30
    # spot check the last 8 queries of head 0 against a dense computation on their keys
    i = torch.arange(n - 8, n, device="cuda")
    mask = P.strided(1024).mask_mod(0, 0, i[:, None], torch.arange(n, device="cuda")[None, :])
    scores = (q[0, 0, i].float() @ k[0, 0].float().T) * 64 ** -0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v[0, 0].float()
    assert_close(got[0][0, 0, i].float(), ref, torch.bfloat16)


@pytest.mark.parametrize("pattern", [P.strided(128), P.fixed(128, 32, distinct=4), P.dense()], ids=str)
def test_triton_half_size_queries_and_keys(pattern):
    """q/k of 32 and v of 64 (half-size attention), no padding, against the reference; both load paths."""
    from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention

    g = torch.Generator(device="cuda").manual_seed(11)
    q, k = (torch.randn(1, 2, 4096, 32, device="cuda", generator=g).bfloat16() for _ in range(2))
    v, grad = (torch.randn(1, 2, 4096, 64, device="cuda", generator=g).bfloat16() for _ in range(2))
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    for tma in (True, False):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out = triton_attention(*x, pattern, 32 ** -0.5, KernelConfig(tma=tma))
        out.backward(grad)
        for a, b in zip([out, *(t.grad for t in x)], want):
            assert_close_norm(a, b, torch.bfloat16)


def _tiny_model(pattern: dict, context: int = 4096, dropout: float = 0.0):
    from sparse_transformer.config import ModelConfig
    from sparse_transformer.model import SparseTransformer

    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(n_layer=2, n_head=4, d_model=256, context=context, dropout=dropout,
                                          **pattern)).cuda()
    for p in model.parameters():  # the logit projection starts at zero: let every gradient carry something
        torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("pattern", [dict(pattern="strided", stride=128),
                                     dict(pattern="fixed", stride=128, summary=32, distinct=2, half_qk=True),
                                     dict(pattern="dense"), dict(pattern="dense", backend="torch")],
                         ids=["strided", "fixed-half-size", "dense-triton", "dense-sdpa"])
def test_compiled_model_fullgraph_matches_eager(pattern):
    """torch.compile(model, fullgraph=True) with Inductor on the GPU under bf16 autocast: no graph break,
    and the loss and gradients no further from an fp32 run of the portable backend than eager's are
    (compilation fuses and rounds differently, so bit equality is not expected)."""
    from sparse_transformer.model import Attention, byte_loss

    model = _tiny_model(pattern)
    tokens = torch.randint(0, 256, (2, 4096), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.autocast("cuda", torch.bfloat16):
        explained = torch._dynamo.explain(model)(tokens)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]

    def loss_and_grads(forward, autocast=True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = byte_loss(forward(tokens), tokens)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True))
    backends = [m.backend for m in model.modules() if isinstance(m, Attention)]
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = "torch"
    reference = loss_and_grads(model, autocast=False)  # fp32, portable backend
    for m, backend in zip([m for m in model.modules() if isinstance(m, Attention)], backends):
        m.backend = backend

    def error(x, ref):
        return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))

    for i, (c, e, r) in enumerate(zip(compiled, eager, reference)):
        assert torch.isfinite(c).all()
        assert error(c, r) <= 2 * error(e, r) + 2e-3, (i, error(c, r), error(e, r))


def test_flex_backend_compiles_in_a_fullgraph_model():
    """A custom pattern (flex backend) inside torch.compile(fullgraph=True): no graph break, eager numbers."""
    from sparse_transformer.model import SparseTransformer

    window = P.custom(lambda b, h, q, k: q - k < 200, "window", per_head=False)
    weights = _tiny_model(dict(pattern="dense"), context=1024)
    model = SparseTransformer(weights.config, pattern=window).cuda()
    model.load_state_dict(weights.state_dict())
    tokens = torch.randint(0, 256, (2, 1024), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        eager = model(tokens).float()
        compiled = torch.compile(model, fullgraph=True)(tokens).float()
    assert_close_norm(compiled, eager, torch.bfloat16)


@pytest.mark.parametrize("pattern", [dict(pattern="strided", stride=128), dict(pattern="fixed", stride=128, summary=32)],
                         ids=["strided", "fixed"])
def test_cuda_graph_captures_a_whole_training_step(pattern):
    """Forward, backward, clipping and the fused AdamW update (with its on-device skip flag) captured
    as one CUDA graph: its replays give the losses and weights of eager steps on the same batches."""
    import copy

    from sparse_transformer.config import TrainConfig
    from sparse_transformer.train.step import TrainStep

    config = TrainConfig()
    model = _tiny_model(pattern, context=2048)
    twin = copy.deepcopy(model)
    batches = torch.randint(0, 256, (4, 2, 2048), device="cuda", dtype=torch.uint8,
                            generator=torch.Generator(device="cuda").manual_seed(3))

    def stepper(net, capturable):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True, capturable=capturable)
        return TrainStep(net, net, optimizer, torch.amp.GradScaler("cuda", enabled=False), "bf16", config, False)

    eager_step = stepper(model, False)
    eager = [float(eager_step(b).loss) for b in batches]

    graph_step = stepper(twin, True)
    static = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (kernels compiled, allocator primed): step 0
        first = graph_step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = graph_step(static)
    replayed = [float(first.loss)]
    for b in batches[1:]:
        static.copy_(b)
        graph.replay()
        replayed.append(float(stats.loss))
    assert replayed == pytest.approx(eager, rel=2e-3)
    for a, b in zip(twin.parameters(), model.parameters()):
        assert_close_norm(a, b, torch.bfloat16)


def test_fp16_training_with_loss_scaling(tmp_path):
    """precision fp16: the loss scaler drives the fused AdamW (its found_inf skips overflowed steps on
    the device); a few steps train, the losses are finite and fall, the checkpoint resumes."""
    import dataclasses

    import numpy as np

    from sparse_transformer.config import DataConfig, ModelConfig, ScheduleConfig, TrainConfig
    from sparse_transformer.data import load_stdlib, split_stream
    from sparse_transformer.train import train

    text = split_stream(np.ascontiguousarray(load_stdlib().train[:2_000_000]), "stdlib-2MB", "text")
    config = TrainConfig(model=ModelConfig(n_layer=2, n_head=4, d_model=128, context=1024, pattern="strided", stride=32),
                         data=DataConfig(batch_size=8, eval_bytes=4096), precision="fp16",
                         optim=dataclasses.replace(TrainConfig().optim, lr=3e-3),
                         schedule=ScheduleConfig(steps=30, warmup_steps=3), log_every=5, sample_bytes=0)
    result = train(config, tmp_path / "run", text, progress=False)
    assert result.stopped == "steps" and len(result.losses) == 30
    assert all(np.isfinite(result.losses)) and np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    resumed = train(dataclasses.replace(config, schedule=ScheduleConfig(steps=32, warmup_steps=3)), tmp_path / "run",
                    text, resume=True, progress=False, final_eval=False)
    assert resumed.step == 32


# ------------------------------------------------------------------ unions of parts (issue 27)
# (test_triton_against_reference runs them too: BUILT_IN + UNIONS)

@pytest.mark.parametrize("pattern", [UNIONS[0], UNIONS[1], UNIONS[3], P.strided(128), P.fixed(128, 32)], ids=str)
def test_flex_forms_against_the_reference(pattern):
    """Every Flex form the benchmark times against the reference: as-is and concatenated with
    gradients; the parts in every combination of their forms (the column part's transposed view and
    packed columns), merged by their log-sum-exps, eager and compiled as one function."""
    import itertools

    from sparse_transformer.attention.concatenated import concatenated_supported
    from sparse_transformer.benchmark import allow_recompiles, flex_forms

    allow_recompiles()  # as the benchmark: past Dynamo's default limit the compiled form would run eager
    q, k, v, grad = inputs((1, 4, 2048, 64), torch.float32, seed=13)
    want = run("reference", pattern, q.double(), k.double(), v.double(), grad.double())
    forms = [lambda a, b, c: BACKENDS["flex"].load()(a, b, c, pattern, 0.125)]
    if concatenated_supported(pattern):
        forms.append(lambda a, b, c: flex_forms.concatenated(a, b, c, pattern, 0.125))
    for form in forms:
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        out = form(a, b, c)
        out.backward(grad)
        for x, y in zip([out.detach(), a.grad, b.grad, c.grad], want):
            assert_close_norm(x, y, torch.float32)
    whole = flex_forms.decomposed_compiled()
    variants = [tuple(part.flex_forms()) for part, _ in flex_forms.part_forms(pattern)]
    with torch.no_grad():
        for chosen in itertools.product(*variants):
            for fn in (flex_forms.decomposed, whole):
                assert_close_norm(fn(q, k, v, pattern, 0.125, chosen), want[0], torch.float32)


def test_auto_routes_unions_by_their_parts():
    q = torch.zeros(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_backend(q, UNIONS[0]) == "triton" and choose_backend(q, UNIONS[1]) == "triton"
    assert choose_backend(q.float(), UNIONS[0]) == "flex"
