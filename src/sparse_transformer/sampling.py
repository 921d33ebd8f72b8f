"""Sampling: ``generate()`` with a sparse key/value cache (PAPER.md, "Sampling").

One byte at a time, each new byte computing attention only over the keys its pattern allows
(see :mod:`sparse_transformer.kvcache`). The prime is run once through the full forward pass,
which fills the cache; every later byte is one static-shape decode step. On a GPU that step can be
compiled (``compile=True``: ``torch.compile(mode="reduce-overhead")``, which fuses it and replays it
as a CUDA graph) or captured as a plain CUDA graph (``compile="cudagraph"``, the default and the
fastest); on the CPU it runs eagerly whatever ``compile`` says.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .kvcache import Decoder
from .model import eval_mode

COMPILE_MODES = (False, True, "reduce-overhead", "cudagraph")


def _check(model: nn.Module, prime: Tensor, steps: int, temperature: float, top_k: Optional[int],
           top_p: Optional[float], generator: Optional[torch.Generator], compile, timings) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "blocks"):
        raise ValueError(f"model must be a SparseTransformer, got {type(model).__name__}")
    if not isinstance(prime, Tensor) or prime.dim() != 2 or prime.dtype != torch.long:
        what = (f"a {prime.dim()}-D {prime.dtype} tensor of shape {tuple(prime.shape)}"
                if isinstance(prime, Tensor) else type(prime).__name__)
        raise ValueError(f"prime must be a 2-D LongTensor [B, P] of bytes (P may be 0), got {what}")
    if prime.shape[0] < 1:
        raise ValueError(f"prime must hold at least one sequence (B >= 1), got shape {tuple(prime.shape)}")
    if prime.numel() and (int(prime.min()) < 0 or int(prime.max()) >= config.vocab_size):
        raise ValueError(f"prime values must be bytes in [0, {config.vocab_size}), got "
                         f"[{int(prime.min())}, {int(prime.max())}]")
    # numbers.Integral / Real: a numpy scalar is a number too (it was refused as "not a finite number").
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if prime.shape[1] + steps > config.context:
        raise ValueError(f"prime length + steps must be <= the model's context {config.context}, got "
                         f"{prime.shape[1]} + {steps} = {prime.shape[1] + steps}")
    _check_options(temperature, top_k, top_p)
    device = model.head.weight.device
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != device.type):
        raise ValueError(f"generator must be a torch.Generator on the model's device ({device}), got {generator!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if timings is not None and not isinstance(timings, dict):  # a list failed after the prefill as a TypeError
        raise ValueError(f"timings must be a dict to fill, or None, got {type(timings).__name__}")


def _check_options(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """The sampling options, for :func:`generate` and the public :func:`sample_next` / :func:`filter_logits`."""
    # numbers.Integral / Real: a numpy scalar is a number too.
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Set logits outside the ``top_k`` largest and outside the nucleus of probability ``top_p``
    (the smallest set of most likely bytes whose mass reaches ``top_p``) to ``-inf``. ``[B, V]``."""
    _check_options(0, top_k, top_p)  # top_k = 0 failed as an IndexError
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this byte already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """One byte per row of ``logits [B, V]``: argmax when ``temperature == 0``, else a draw from
    ``softmax(filter(logits) / temperature)``. Returns LongTensor ``[B]``."""
    _check_options(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    # Less the largest first, and no temperature below fp32's smallest normal (1e-300 is 0 in fp32): at a
    # tiny temperature the largest was inf (or 0 / 0) and the softmax NaN; now the others go to -inf.
    logits = logits.float()
    shifted = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    logits = filter_logits(shifted, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)


def _cuda_graph(decoder: Decoder, token: Tensor, t: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Capture one decode step as a CUDA graph; returns ``step(token, t)`` replaying it.

    Warm-up and capture run the step for the real first inputs: a step only writes the cache at
    its own position, so running it again is harmless.
    """
    static_token, static_t = token.clone(), t.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            decoder(static_token, static_t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = decoder(static_token, static_t)

    def step(token: Tensor, t: Tensor) -> Tensor:
        static_token.copy_(token)
        static_t.copy_(t)
        graph.replay()
        return static_logits

    return step


def make_step(decoder: Decoder, compile: Union[bool, str], token: Tensor, t: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The decode-step function for ``compile`` (see the module docstring); eager on the CPU."""
    if compile is False or token.device.type != "cuda":
        return decoder
    if compile == "cudagraph":
        return _cuda_graph(decoder, token, t)
    compiled = torch.compile(decoder, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def step(token: Tensor, t: Tensor) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
        return compiled(token, t)

    return step


class _Clock:
    """Wall-clock laps for ``generate(timings=...)``; does nothing (and never syncs) without a dict."""

    def __init__(self, timings: Optional[dict], device: torch.device):
        self.timings, self.device = timings, device
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now


@torch.no_grad()
def generate(model: nn.Module, prime: Tensor, steps: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None, *,
             compile: Union[bool, str] = "cudagraph", backend: str = "auto", progress: bool = False,
             timings: Optional[dict] = None) -> Tensor:
    """Continue ``prime`` by ``steps`` bytes with a sparse key/value cache.

    Args:
        model: a :class:`~sparse_transformer.model.SparseTransformer` (put in eval mode while sampling).
        prime: LongTensor ``[B, P]`` of bytes; ``P`` may be 0 (unconditional samples).
        steps: new bytes per sequence; ``P + steps <= model.config.context``.
        temperature: divides the logits; 0 means greedy (argmax; ``top_k``/``top_p`` then do nothing).
        top_k: keep only the k most likely bytes. top_p: nucleus sampling, in (0, 1].
        generator: a ``torch.Generator`` on the model's device, for reproducible draws.
        compile: ``"cudagraph"`` (default: capture the step as a CUDA graph, the fastest), False
            (eager), or True / ``"reduce-overhead"`` (torch.compile + CUDA graphs: slow to compile);
            GPU only, the CPU path is always eager.
        backend: attention over the cached keys: ``"triton"`` (one fused kernel per layer),
            ``"torch"``, or ``"auto"`` (Triton on CUDA, else PyTorch); see :class:`Decoder`.
        progress: show a tqdm bar in bytes per second.
        timings: if a dict, filled with ``prefill_s``, ``setup_s`` (CUDA graph capture), ``first_step_s``
            (includes compilation), ``steps_s`` (the other steps) and ``cache_bytes``; the device is
            synchronized at those points only when it is given.

    Returns LongTensor ``[B, P + steps]`` (the prime followed by the samples) on ``prime``'s device.
    Work per byte and layer is O(keys per query) for dense, strided and fixed patterns in every
    integration mode; custom patterns evaluate their mask function over the context (O(N)).
    """
    _check(model, prime, steps, temperature, top_k, top_p, generator, compile, timings)
    steps = int(steps)
    b, p = prime.shape
    if steps == 0:
        return prime.clone()
    device = model.head.weight.device
    clock = _Clock(timings, device)
    with eval_mode(model):
        out = torch.empty(b, p + steps, dtype=torch.long, device=device)
        out[:, :p] = prime.to(device)
        decoder = Decoder(model, b, backend)
        # Positions 0..P: the last one's input is the last prime byte (the placeholder is never read).
        logits = decoder.prefill(torch.cat([out[:, :p], out.new_zeros(b, 1)], dim=1))[:, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, p] = token
        clock.lap("prefill_s")
        positions = torch.arange(p + steps, device=device)
        step = make_step(decoder, compile, token, positions[p + 1]) if steps > 1 else decoder
        clock.lap("setup_s")
        from tqdm.auto import tqdm
        with tqdm(total=b * steps, unit="B", unit_scale=True, disable=not progress, desc="sampling") as bar:
            bar.update(b)
            for t in range(p + 1, p + steps):
                token = sample_next(step(token, positions[t]), temperature, top_k, top_p, generator)
                out[:, t] = token
                bar.update(b)
                if t == p + 1:
                    clock.lap("first_step_s")
        clock.lap("steps_s")
        if timings is not None:
            timings["cache_bytes"] = decoder.cache_bytes()
    return out.to(prime.device)
