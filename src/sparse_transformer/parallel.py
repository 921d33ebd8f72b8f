"""Everything the single-device model does not know: processes, recompute, compile, DDP/FSDP, precision.

One documented order (torchtitan's), applied by :func:`parallelize`:

1. **activation checkpointing** per block (PAPER.md: recompute attention and feed-forward in the
   backward pass), by wrapping each block's ``forward``, so parameter names do not change;
2. **torch.compile** per block (``Module.compile`` compiles in place, names unchanged);
3. **distribution**: DDP around the whole model, with bf16 compression of the gradient all-reduce
   (the paper sent half-precision gradients), or FSDP2 ``fully_shard`` on each block, then the root.

Precision policy: fp32 master weights always; on GPU bf16 autocast by default, or fp16 autocast
with dynamic loss scaling (``GradScaler``) as in the paper; fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TrainConfig

WAIT_TIMEOUT = timedelta(hours=6)  # converting ImageNet or a large audio folder takes a while


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # A gloo group with a long timeout for ranks that wait on rank 0 (data preparation, checkpoint
    # hashing, sampling): NCCL's watchdog would kill them after 10 minutes.
    wait_group: Optional[object] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: Optional[str | torch.device] = None, local_rank: int = 0,
                   world_size: int = 1) -> torch.device:
    """The device for ``--device``: default this process's GPU, else the CPU; ``cuda`` alone means
    ``cuda:<local_rank>``. A misspelt name, a GPU that is not there, or one GPU named for several
    processes is a ``ValueError`` here, not a RuntimeError or an AssertionError from inside torch."""
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):  # "meta" failed as a "truncated or corrupt" weights file
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda":
        if dev.index is not None and world_size > 1:
            raise ValueError(f"device {str(device)!r} names one GPU, but {world_size} processes would share it; "
                             "pass --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here; use cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    return dev


def init_world(device: Optional[str] = None) -> World:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), start the process group
    (NCCL on GPU, gloo on CPU) and pick the device (see :func:`resolve_device`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    wait_group = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return World(rank, world_size, local_rank, dev, wait_group)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` means bf16 on GPU and fp32 on CPU; half precision needs a GPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 (with loss scaling) needs a CUDA device; use fp32 or bf16 on CPU")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a resolved precision ("fp32", "bf16", "fp16") computes the forward pass in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: torch.device):
    """The forward-pass context for a resolved precision ("fp32", "bf16", "fp16")."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16; a disabled scaler (a no-op) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def apply_recompute(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's ``forward`` becomes a method bound to the block itself, so parameter names do not
    change, ``copy.deepcopy`` rebinds it to the copy, and applying this twice changes nothing.
    """
    for block in model.blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)


def wait_for_all(world: World) -> None:
    """A barrier that tolerates one rank working alone for a long time (see ``World.wait_group``)."""
    if world.distributed:
        dist.barrier(group=world.wait_group)


@contextlib.contextmanager
def main_process_first(world: World):
    """Run the body on rank 0 first, then on the other ranks (e.g. to prepare a shared data
    cache once); every rank enters it."""
    if not world.main:
        wait_for_all(world)
    yield
    if world.main:
        wait_for_all(world)


def compiles(config: TrainConfig, device: torch.device) -> bool:
    """Whether a run uses torch.compile: ``config.compile``, or when unset, on a GPU (on the CPU the
    compile time outweighs what it saves in a short run)."""
    return config.compile if config.compile is not None else device.type == "cuda"


def parallelize(model: nn.Module, config: TrainConfig, world: World) -> nn.Module:
    """Apply recompute, compile and distribution (in that order) and return the module to train.

    ``model`` keeps its parameters (FSDP2 shards them in place); save and evaluate through it.
    """
    if config.recompute:
        apply_recompute(model)
    if compiles(config, world.device):
        for block in model.blocks:
            block.compile()
    if not world.distributed:
        return model
    if config.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [world.device.index] if world.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids)
    compress = config.grad_compress
    if compress == "auto":
        compress = "bf16" if dist.get_backend() == "nccl" else "none"
    if compress == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def no_sync(wrapped: nn.Module, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if last_micro_step or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.world_size
    return value


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
    return value
