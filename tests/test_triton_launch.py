"""The direct launcher (``attention/triton_launch.py``) on the CPU: a JIT function whose ``run``
records its calls stands in for compiling. The GPU test of the real path is in test_gpu.py."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'sparse-transformer[triton]')")


def _kernel(X, Y, n, scale, BLOCK: "tl.constexpr", EVEN: "tl.constexpr" = True):  # noqa: F821
    pass


class Compiled:
    """What the JIT returns: the launcher API of a Triton 3 CompiledKernel."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit, *args):
        self.launches.append(((g0, g1, g2), stream, args))


@pytest.fixture
def launcher(monkeypatch):
    from triton.runtime.jit import JITFunction

    from sparse_transformer.attention import triton_launch

    class Driver:  # no CUDA here: device 0, stream 7
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 7

    monkeypatch.setattr(triton_launch, "driver", SimpleNamespace(active=Driver()))
    monkeypatch.setattr(triton_launch, "direct_launch_supported", lambda: True)  # as on a checked release

    class FakeJIT(JITFunction):
        def run(self, *args, grid, warmup, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            self.compiled.append(Compiled())
            return self.compiled[-1]

    kernel = FakeJIT(_kernel)
    kernel.jit_calls, kernel.compiled = [], []
    return triton_launch.Launcher(kernel), kernel


def test_first_call_of_a_key_goes_through_the_jit_later_ones_straight_to_the_launcher(launcher):
    launch, kernel = launcher
    x, y = torch.zeros(64), torch.zeros(64)
    launch[(4,)](x, y, 10, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.jit_calls) == 1 and kernel.compiled[0].launches == []
    x2, y2 = torch.ones(64), torch.ones(64)
    launch[(5, 2)](x2, y2, 10, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.jit_calls) == 1
    (grid, stream, args), = kernel.compiled[0].launches
    # every parameter in signature order, the constexprs by name or their defaults; options left out
    assert grid == (5, 2, 1) and stream == 7
    assert args[0] is x2 and args[1] is y2 and args[2:] == (10, 0.5, 16, True)


@pytest.mark.parametrize("change", ["integer", "constexpr", "option", "dtype", "alignment"])
def test_anything_the_jit_specializes_on_is_a_new_key(launcher, change):
    launch, kernel = launcher
    storage = torch.zeros(200)
    x, y = storage[:64], torch.zeros(64)
    args, kwargs = [x, y, 10, 0.5], dict(BLOCK=16, num_warps=4)
    launch[(1,)](*args, **kwargs)
    if change == "integer":
        args[2] = 16  # the JIT specializes integers divisible by 16 (and 1)
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "option":
        kwargs["num_warps"] = 8
    elif change == "dtype":
        args[1] = torch.zeros(64, dtype=torch.float16)
    else:
        args[0] = storage[1:65]  # 4 bytes past an aligned start: not 16-byte aligned
    launch[(1,)](*args, **kwargs)
    assert len(kernel.jit_calls) == 2
    assert all(c.launches == [] for c in kernel.compiled)


def test_an_argument_it_cannot_key_is_an_error(launcher):
    launch, _ = launcher
    with pytest.raises(TypeError, match="Launcher cannot key an argument of type list"):
        launch[(1,)](torch.zeros(4), [1, 2], 10, 0.5, BLOCK=16)


def test_without_the_launcher_api_every_call_goes_through_the_jit(launcher):
    launch, kernel = launcher
    kernel.compiled.append(None)
    kernel.run = lambda *args, grid, warmup, **kwargs: kernel.jit_calls.append(grid)  # returns None
    for _ in range(3):
        launch[(1,)](torch.zeros(4), torch.zeros(4), 10, 0.5, BLOCK=16)
    assert len(kernel.jit_calls) == 3


def test_a_tensor_by_keyword_is_an_error(launcher):
    launch, _ = launcher
    with pytest.raises(TypeError, match="pass tensors and descriptors positionally"):
        launch[(1,)](torch.zeros(4), 10, 0.5, Y=torch.zeros(4), BLOCK=16)


def test_the_direct_path_is_for_checked_releases_only():
    from sparse_transformer.attention import triton_launch

    assert triton_launch.direct_launch_supported("3.6.0") and not triton_launch.direct_launch_supported("3.9.1")
    assert not triton_launch.direct_launch_supported("4.0.0+git1234")


def test_an_unchecked_triton_release_takes_the_public_jit_path(launcher, monkeypatch):
    from sparse_transformer.attention import triton_launch

    _, kernel = launcher
    monkeypatch.setattr(triton_launch, "direct_launch_supported", lambda: False)
    launch = triton_launch.Launcher(kernel)
    for _ in range(3):
        launch[(1,)](torch.zeros(4), torch.zeros(4), 10, 0.5, BLOCK=16)
    assert len(kernel.jit_calls) == 3 and all(c.launches == [] for c in kernel.compiled)
