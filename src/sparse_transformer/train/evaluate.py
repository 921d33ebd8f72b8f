"""Evaluation in bits per byte (bits per dim for images) the paper's way, and a demo sampler.

Every byte of the split is predicted exactly once, with as much context as the model takes
(see :func:`~sparse_transformer.data.batches.eval_windows`). Under several processes each rank
scores its share of the windows and the sums are added up.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import eval_batches, eval_windows
from ..model import byte_loss, eval_mode
from ..parallel import World, all_reduce_sum, autocast


@torch.no_grad()
def evaluate(model: nn.Module, data: np.ndarray, context: int, world: World = World(), *,
             stride: Optional[int] = None, example_length: Optional[int] = None,
             max_bytes: Optional[int] = None, batch_size: int = 8, precision: str = "fp32",
             progress: bool = False, desc: str = "eval") -> tuple[float, int]:
    """Bits per byte of ``model`` on the uint8 split ``data``; returns ``(bits_per_byte, bytes_scored)``.

    ``max_bytes`` bounds the evaluation to the first ``max_bytes`` bytes of a stream, or to the
    whole images of an image set that fit in it (at least one must). ``progress`` shows a bar over
    the forward passes, titled ``desc``.
    """
    # A batch of 0 or less gives no forward pass at all, and the result NaN over 0 bytes.
    if batch_size < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError(f"evaluate: batch_size and max_bytes must be >= 1, got {batch_size}, {max_bytes}")
    if max_bytes is not None and example_length is None:
        data = data[:max_bytes]  # at most that many bytes scored, and every one of them with its context
    windows = eval_windows(len(data), context, stride, example_length, max_bytes)
    mine = windows[world.rank::world.world_size]
    # The same number of forward passes on every rank (FSDP gathers weights collectively).
    passes = math.ceil(math.ceil(len(windows) / world.world_size) / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    bar = tqdm(total=passes, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=not progress)
    with eval_mode(model), bar:
        for i in range(passes):
            group, weight = mine[i * batch_size:(i + 1) * batch_size], 1.0
            if not group:  # this rank ran out of windows: run one for the collectives, count nothing
                group, weight = windows[:1], 0.0
            tokens, first = next(eval_batches(data, group, context, len(group)))
            x = torch.from_numpy(np.ascontiguousarray(tokens)).to(world.device).long()
            with autocast(precision, world.device):
                logits = model(x)
            nll = byte_loss(logits, x, reduction="none").view(x.shape)  # (b, n) nats
            scored = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.from_numpy(first).to(x.device)[:, None]
            total += torch.stack([(nll * scored).sum().double(), scored.sum().double()]) * weight
            bar.update()
    total = all_reduce_sum(total, world)
    return (total[0] / total[1]).item() / math.log(2), int(total[1].item())


@torch.no_grad()
def sample_bytes(model: nn.Module, length: int, prompt: bytes = b"", temperature: float = 1.0,
                 seed: int = 0, device: torch.device | str = "cpu") -> bytes:
    """Sample ``length`` bytes after ``prompt`` (the sparse key/value cache of
    :func:`sparse_transformer.sampling.generate`). Deterministic for a given ``seed``."""
    from ..sampling import generate

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    context = model.config.context
    prompt = prompt[-(context - length):] if length < context else b""
    length = min(length, context - len(prompt))
    generator = torch.Generator(device=device).manual_seed(seed)
    prime = torch.tensor([list(prompt)], dtype=torch.long, device=device).reshape(1, len(prompt))
    # Eager: a short sample between training steps is not worth a CUDA graph's capture and memory pool.
    out = generate(model, prime, length, temperature=temperature, generator=generator, compile=False)
    return bytes(out[0, len(prompt):].tolist())
