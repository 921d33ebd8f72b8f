"""torch.compile of the model (fullgraph, no graph break) and the registered attention ops.

The GPU versions (Triton kernels inside a compiled model, a CUDA-graph-captured training step)
are in test_gpu.py.
"""

import importlib.util
import os

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.config import ModelConfig
from sparse_transformer.model import SparseTransformer, byte_loss
from tolerances import assert_close

P = st.patterns
needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton ops run on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)")

MODELS = {  # name -> model config fields: every pattern and way of combining its parts
    "fixed-merged": dict(pattern="fixed", stride=8, summary=2, distinct=2),
    "strided-merged": dict(pattern="strided", stride=8),
    "dense": dict(pattern="dense"),
    "fixed-split-half-size": dict(pattern="fixed", stride=8, summary=2, integration="split", half_qk=True),
    "strided-interleaved": dict(pattern="strided", stride=8, integration="interleaved"),
    "union-merged": dict(pattern="global_tokens:4+local:8+column:8"),
    "union-split": dict(pattern="block:8+summary:8:2:2+column:5", integration="split"),
}


def tiny(backend: str, **fields) -> SparseTransformer:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=4, d_model=64, context=64, backend=backend, dropout=0.0, **fields)
    model = SparseTransformer(config)
    for p in model.parameters():  # the output projection starts at zero: give every gradient something to carry
        torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, forward, tokens):
    model.zero_grad(set_to_none=True)
    loss = byte_loss(forward(tokens), tokens)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_has_no_graph_break_and_matches_eager(name):
    model = tiny("torch", **MODELS[name])
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    explained = torch._dynamo.explain(model)(tokens)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    eager_loss, eager_grads = loss_and_grads(model, model, tokens)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # tracing and autograd, not codegen
    loss, grads = loss_and_grads(model, compiled, tokens)
    assert_close(loss, eager_loss, torch.float32)
    for key, grad in eager_grads.items():
        assert_close(grads[key], grad, torch.float32)


@pytest.mark.parametrize("pattern", [P.custom(lambda b, h, q, k: q - k < 20, "window", per_head=False),
                                     P.local(16) | P.global_tokens(4)], ids=["custom", "union"])
def test_flex_backend_traces_without_graph_break(pattern):
    """The flex backend's function (CUDA-only as a backend; FlexAttention has no CPU backward) in a
    fullgraph trace on CPU: no graph break, eager numbers. A GPU test runs it inside the model."""
    from sparse_transformer.attention.flex import flex_attention

    q, k, v = torch.randn(3, 2, 2, 64, 16, generator=torch.Generator().manual_seed(4)).unbind(0)
    with torch.no_grad():
        eager = flex_attention(q, k, v, pattern, 0.25)
        explained = torch._dynamo.explain(flex_attention)(q, k, v, pattern, 0.25)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        compiled = torch.compile(flex_attention, fullgraph=True, backend="aot_eager")(q, k, v, pattern, 0.25)
    assert_close(compiled, eager, torch.float32)
    assert_close(eager, st.sparse_attention(q.double(), k.double(), v.double(), pattern, 0.25, backend="reference"),
                 torch.float32)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    """The default compiler (Inductor's generated CPU code) on one pattern: same loss and gradients."""
    model = tiny("torch", **MODELS["fixed-merged"])
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    eager_loss, eager_grads = loss_and_grads(model, model, tokens)
    loss, grads = loss_and_grads(model, torch.compile(model, fullgraph=True), tokens)
    assert_close(loss, eager_loss, torch.float32)
    for key, grad in eager_grads.items():
        assert_close(grads[key], grad, torch.float32)


def test_the_ops_are_registered_in_our_namespace():
    ops = torch.ops.sparse_transformer
    for name in ("triton_attention", "triton_attention_backward"):
        assert hasattr(ops, name), name
    assert "str pattern, float scale, str config" in str(ops.triton_attention.default._schema)


@needs_interpreter
@pytest.mark.parametrize("pattern,n,dqk,dv", [
    (P.strided(8), 70, 16, 16), (P.fixed(8, 2, distinct=2), 70, 16, 32), (P.dense(), 40, 32, 16),
    (P.strided(4), 32, 16, 16),  # columns of 8 rows: the packed column kernel
], ids=str)
def test_ops_pass_opcheck(pattern, n, dqk, dv):
    """Schema, fake (meta) implementation, autograd registration and dynamic-shape tracing."""
    g = torch.Generator().manual_seed(n)
    q, k = (torch.randn(1, 2, n, dqk, generator=g).half().requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, n, dv, generator=g).half().requires_grad_()
    forward = torch.ops.sparse_transformer.triton_attention.default
    torch.library.opcheck(forward, (q, k, v, pattern.spec, 0.25, ""))
    out, lse = forward(q, k, v, pattern.spec, 0.25, "")
    assert out.shape == (1, 2, n, dv) and lse.shape == (1, 2, n) and lse.dtype == torch.float32
    grad = torch.randn(out.shape, generator=g).half()
    backward = torch.ops.sparse_transformer.triton_attention_backward.default
    torch.library.opcheck(backward, (q.detach(), k.detach(), v.detach(), out.detach(), lse, grad, pattern.spec,
                                     0.25, ""))


@needs_interpreter
def test_triton_backend_compiles_without_graph_break():
    """The Triton op inside a compiled function (interpreter on CPU): one graph, the eager numbers."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g).half().requires_grad_() for _ in range(3))

    def f(q, k, v):
        return st.sparse_attention(q, k, v, P.fixed(8, 2), backend="triton").float().square().sum()

    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
