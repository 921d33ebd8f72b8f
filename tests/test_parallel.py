"""parallel.py on one CPU process: recompute, device choice, precision policy.
(DDP and FSDP2 on two processes: test_distributed.py.)"""

import copy

import pytest
import torch

from sparse_transformer import SparseTransformer
from sparse_transformer.config import ModelConfig
from sparse_transformer.model import byte_loss
from sparse_transformer.parallel import apply_recompute, init_world, resolve_precision

CONFIG = ModelConfig(n_layer=2, n_head=2, d_model=32, context=64, pattern="strided", stride=8)


def model_and_tokens():
    torch.manual_seed(0)
    model = SparseTransformer(CONFIG)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # not the zero init: gradients reach every layer
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    return model, tokens


def grads(model, tokens):
    model.zero_grad()
    byte_loss(model(tokens), tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_gives_the_same_gradients_and_keeps_names():
    model, tokens = model_and_tokens()
    names = [n for n, _ in model.named_parameters()]
    expected = grads(model, tokens)
    apply_recompute(model)
    got = grads(model, tokens)
    assert list(got) == names
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_recompute_survives_deepcopy_and_a_second_call():
    model, tokens = model_and_tokens()
    apply_recompute(model)
    apply_recompute(model)  # no double wrapping
    assert model.blocks[0].forward.__self__ is model.blocks[0]
    twin = copy.deepcopy(model)
    assert twin.blocks[0].forward.__self__ is twin.blocks[0]
    with torch.no_grad():
        for p in twin.blocks.parameters():
            p.zero_()
    # the copy computes with its own (zeroed) weights, not the original's
    assert not torch.allclose(twin(tokens), model(tokens))


def test_one_gpu_index_cannot_be_shared_by_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="pass --device cuda"):
        init_world("cuda:0")


def test_single_process_world_on_cpu():
    world = init_world("cpu")
    assert (world.rank, world.world_size, world.device.type, world.main, world.distributed) == (0, 1, "cpu", True, False)


def test_precision_policy():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", gpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 .* needs a CUDA device"):
        resolve_precision("fp16", cpu)
