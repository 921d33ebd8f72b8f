"""One optimizer step that never waits for the GPU (PAPER.md, "Efficiency in the paper").

The step leaves its loss and whether it was skipped on the device; the loop (:mod:`.loop`) reads
them at log steps only, so the host queues the next step while the GPU still runs this one. The
skip of a non-finite loss or gradient is decided on the device too: the fused AdamW kernel leaves
parameters and state untouched when its ``found_inf`` flag is set, the interface through which
``torch.amp.GradScaler`` drives fused optimizers (and does so itself under fp16).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..model import byte_loss
from ..parallel import autocast, no_sync

# Why a step was skipped, as stored in StepStats.problem.
PROBLEMS = {1: "loss", 2: "gradient"}


@dataclass
class StepStats:
    """What one step leaves on the device (read them in batches: each read waits for the GPU)."""

    loss: Tensor     # 0-dim fp32: this process's mean training loss of the step, in nats
    problem: Tensor  # 0-dim int: 0, or the key of PROBLEMS that made the step a skipped one


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel for all parameters; it can skip a step on the device); weight decay
    on weight matrices only (not biases, norms or embedding tables)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        is_table = name.startswith(("token.", "positions.", "start"))
        (decay if p.dim() >= 2 and not is_table else rest).append(p)
    o = config.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=o.lr, betas=o.betas, eps=o.eps, fused=True)


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping); the norm before clipping as a
    0-dim tensor on the device (inf or nan when some gradient is not finite). Collective under FSDP."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


class TrainStep:
    """``step(batch)``: forward and backward over ``grad_accum`` micro-batches, gradient clipping and
    the optimizer update, skipped on the device when the loss or (except under fp16, whose loss
    scaler skips overflowed steps itself) the gradient is not finite. Returns :class:`StepStats`.

    ``model`` holds the parameters (clipping reads them), ``wrapped`` is what runs the forward pass
    (the model itself, or its DDP wrapper); ``fsdp`` says whether ``model`` is sharded by FSDP2.
    With ``compile`` the loss is compiled too (the logits' fp32 cast, log-softmax and mean fused);
    the blocks are compiled by :func:`~sparse_transformer.parallel.parallelize`.
    """

    def __init__(self, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, precision: str, config: TrainConfig, fsdp: bool,
                 compile: bool = False):
        self.model, self.wrapped, self.optimizer, self.scaler = model, wrapped, optimizer, scaler
        self.precision, self.config, self.fsdp = precision, config, fsdp
        self.loss = torch.compile(byte_loss) if compile else byte_loss
        self.updating = False  # True while the optimizer writes the parameters
        self.updated = False  # the parameters hold this call's update (the loop resets it per step)

    def __call__(self, batch: Tensor) -> StepStats:
        config, scaler = self.config, self.scaler
        device = self.model.head.weight.device
        total = torch.zeros((), device=device)
        for i, micro in enumerate(batch.chunk(config.grad_accum)):
            last_micro = i == config.grad_accum - 1
            if self.fsdp:
                self.wrapped.set_requires_gradient_sync(last_micro)
            with no_sync(self.wrapped, last_micro), autocast(self.precision, device):
                logits = self.wrapped(micro)
            loss = self.loss(logits, micro)
            scaler.scale(loss / config.grad_accum).backward()
            total += loss.detach() / config.grad_accum
        scaler.unscale_(self.optimizer)  # a no-op unless fp16
        norm = clip_gradients(self.model, config.optim.grad_clip)
        bad_loss = ~torch.isfinite(total)
        if self.precision == "fp16":  # overflowed gradients: the scaler skips and lowers its scale
            problem = bad_loss.int()
            with self._updating():
                scaler.step(self.optimizer)
                scaler.update()
        else:
            problem = torch.where(bad_loss, 1, torch.where(torch.isfinite(norm), 0, 2))
            with self._updating():
                self.optimizer.found_inf = (problem > 0).float()  # the fused kernel's skip flag
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(total, problem)

    @contextlib.contextmanager
    def _updating(self):
        self.updating = True
        yield
        self.updating = False
        self.updated = True
