"""The training loop (PAPER.md, "Efficiency in the paper"): AdamW with decoupled weight decay,
linear warm-up then cosine decay, gradient clipping, gradient accumulation, mixed precision,
limits by steps, epochs or wall-clock time, checkpoints, exact resume, several processes.

Exactness: batch ``s`` depends only on ``(seed, s)``, the learning rate only on the step (and,
for time-limited runs, the training time), and checkpoints hold weights, optimizer, scaler and
RNG states, so on CPU a stopped-and-resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig, read_json, to_dict
from ..data import ByteDataset, check_context, position_axes
from ..data.batches import Prefetcher, TrainBatches
from ..model import SparseTransformer, backend_refusal, join_qkv
from ..parallel import (World, all_reduce_mean, close_world, compiles, compute_dtype, init_world, make_scaler,
                        main_process_first, parallelize, resolve_precision, wait_for_all)
from ..weights import weight_shapes
from . import checkpoint as ckpt
from . import run_folder
from .checkpoint import checkpoint_dir
from .evaluate import evaluate, sample_bytes
from .metrics import Metrics, plot_metrics
from .source import load_dataset
from .step import PROBLEMS, StepStats, TrainStep, build_optimizer
from .stopping import StopRequest


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    step: int                                   # optimizer steps done in total
    losses: list[float] = field(default_factory=list)  # training loss per step of this process (nats)
    stopped: str = ""                           # "steps", "epochs", "time", "interrupted", "non-finite"
    checkpoint: Optional[Path] = None           # the latest good checkpoint
    validation_bits_per_byte: Optional[float] = None
    test_bits_per_byte: Optional[float] = None
    test_bytes: int = 0                         # bytes scored for the test figure
    test_split_bytes: int = 0                   # bytes in the whole test split
    sample: Optional[bytes] = None
    nonfinite: int = 0                          # skipped (non-finite) steps in a row at the end


class Schedule:
    """Learning rate and stopping rule from the step count and the training time."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        s = config.schedule
        if s.epochs and s.epochs * steps_per_epoch >= 2 ** 62:  # would overflow counting steps
            raise ValueError(f"schedule.epochs {s.epochs:g} is more steps than can be counted ({steps_per_epoch:,} "
                             f"per epoch); expected at most {2 ** 62 // steps_per_epoch:,} epochs")
        limits = [x for x in (s.steps, s.epochs and math.ceil(s.epochs * steps_per_epoch)) if x]
        self.max_steps = min(limits) if limits else None
        self.max_time, self.peak, self.floor = s.max_time, config.optim.lr, s.min_lr_ratio
        # Short runs warm up for a tenth of the run at most.
        self.warmup = min(s.warmup_steps, self.max_steps // 10) if self.max_steps else s.warmup_steps
        self.stop_reason = "epochs" if s.epochs and self.max_steps != s.steps else "steps"

    def progress(self, step: int, elapsed: float) -> float:
        done = [step / self.max_steps] if self.max_steps else []
        if self.max_time:
            done.append(elapsed / self.max_time)
        return min(1.0, max(done))

    def lr(self, step: int, elapsed: float) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress(step, elapsed)))
        return self.peak * (self.floor + (1 - self.floor) * cosine)

    def stop(self, step: int, elapsed: float) -> Optional[str]:
        if self.max_steps and step >= self.max_steps:
            return self.stop_reason
        if self.max_time and elapsed >= self.max_time:
            return "time"
        return None


def _full_state_options():
    """Unsharded state dicts gathered onto rank 0's CPU (other ranks get empty ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _states(model: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; collective under FSDP."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        options = _full_state_options()
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    return model.state_dict(), optimizer.state_dict()


def _load_optimizer(model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _agreed_checkpoint(run_dir: Path, world: World) -> Optional[Path]:
    """The checkpoint to resume from: rank 0 finds the newest one that is intact and loads and tells
    the others, so every rank resumes from the same step."""
    found = [ckpt.latest_checkpoint(run_dir, deep=True) if world.main else None]
    if world.distributed:
        torch.distributed.broadcast_object_list(found, src=0, group=world.wait_group)
    return found[0]


def _unsharded_copy(model: nn.Module, model_config: ModelConfig, world: World) -> Optional[nn.Module]:
    """On rank 0, a plain copy of an FSDP-sharded model on the CPU (the sampler's key/value-cache
    decoder calls submodules one by one, which FSDP2 does not unshard); None elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_full_state_options())
    if not world.main:
        return None
    copy = SparseTransformer(model_config)  # on the CPU: the GPU still holds the sharded run
    copy.load_state_dict(state)
    return copy


def _load_model(model: nn.Module, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def train(config: TrainConfig, run_dir: str | Path, dataset: Optional[ByteDataset] = None, resume: bool = False,
          *, device: Optional[str] = None, progress: bool = True, final_eval: bool = True,
          on_step: Optional[Callable[[int, float], None]] = None, force: bool = False) -> RunResult:
    """Train ``config`` writing checkpoints and metrics into ``run_dir``; see the module docstring.

    ``on_step(step, loss)`` runs after every step with the step's loss as a 0-dim tensor on the
    device (reading it waits for the GPU; the loop itself reads losses only at log steps). Raising
    ``KeyboardInterrupt`` there stops the run like Ctrl-C: a checkpoint is written and the run can be
    resumed. Under torchrun every process calls this; rank 0 reports. The run holds ``run_dir``'s
    lock throughout: a second training there is refused. A fresh run into a folder that holds an
    earlier run's ``train.json`` or metrics is refused unless ``force``.
    """
    run_dir = Path(run_dir)
    world = init_world(device)
    try:
        with run_folder.hold(run_dir, world):
            if not resume:
                run_folder.refuse_overwrite(run_dir, force)
            result = _train(config, run_dir, dataset, resume, world, progress, final_eval, on_step)
            wait_for_all(world)  # rank 0 may still be sampling: no rank tears the group down before it
        return result
    finally:
        close_world(world)


def _resume_point(run_dir: Path, resume: bool, world: World) -> Optional[Path]:
    """The checkpoint to continue from (None: start fresh), refusing what would lose or mix up runs.
    Every rank gets the same answer (see :func:`_agreed_checkpoint`)."""
    existing = ckpt.list_checkpoints(run_dir)
    if resume:
        found = _agreed_checkpoint(run_dir, world)
        if found is None:  # training from scratch is not what --resume asked for
            damaged = f" ({len(existing)} damaged: {', '.join(p.name for p in existing)})" if existing else ""
            raise ValueError(f"cannot resume: {checkpoint_dir(run_dir)} holds no intact checkpoint{damaged}; "
                             f"drop --resume to start a fresh run")
        shapes = weight_shapes(found)
        if join_qkv(shapes).keys() != shapes.keys():  # its optimizer state follows the three old parameters
            raise ValueError(f"checkpoint {found} was written by an older version whose attention had separate "
                             f"query/key/value projections: its weights still load for eval and sample "
                             f"(--checkpoint), but its optimizer state cannot continue this run")
        return found
    if existing:
        # A fresh run here would replace same-numbered checkpoints and its own would be pruned as the
        # oldest: the earlier run's work is lost either way.
        raise ValueError(f"{run_dir} already holds checkpoints of an earlier run (latest {existing[-1].name}); "
                         f"pass --resume to continue it, or choose another run folder (--out)")
    return None


def _positions_from_data(config: TrainConfig, dataset: ByteDataset, saved: Optional[ModelConfig]) -> TrainConfig:
    """Images bring their own position axes (row, column, channel): a model config without
    ``position_axes`` takes them from the data; one with other axes is refused. A run resumed
    from a checkpoint saved without them (before the axes came from the data) keeps its layout."""
    if not dataset.image_shape:
        return config
    if saved is not None and saved.position_axes is None and config.model.position_axes is None:
        warnings.warn("resuming a run whose model has stream position axes on image data; keeping them "
                      "(a fresh run would take the images' (H, W, C) axes)")
        return config
    axes = position_axes(dataset, config.model.context, config.model.stride)
    if config.model.position_axes is None:
        return replace(config, model={"position_axes": axes})
    if config.model.position_axes != axes:
        raise ValueError(f"model.position_axes {config.model.position_axes} do not match the images of "
                         f"{dataset.name} ({'x'.join(map(str, axes))}); leave position_axes unset to take "
                         f"them from the data")
    return config


def _model_differences(saved: ModelConfig, current: ModelConfig) -> str:
    return ", ".join(f"{f.name} {getattr(saved, f.name)!r} -> {getattr(current, f.name)!r}"
                     for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(current, f.name))


def _train(config, run_dir, dataset, resume, world: World, progress, final_eval, on_step) -> RunResult:
    run = _setup(config, run_dir, dataset, resume, world, progress)
    result = RunResult(step=run.step, checkpoint=run.found)
    reason, updating = _cadence(run, result, on_step)
    return _finish(run, result, reason, updating, final_eval)


@dataclass
class _Run:
    """A run being trained: what :func:`_setup` built, and where the run stands (``step``,
    ``elapsed``: seconds of training, checkpoints and evaluations excluded)."""

    config: TrainConfig
    run_dir: Path
    world: World
    precision: str
    dataset: ByteDataset
    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: TrainBatches
    schedule: Schedule
    metrics: Metrics
    found: Optional[Path]
    fsdp: bool
    step: int
    elapsed: float
    progress: bool  # progress bars (training and evaluation)
    validated: Optional[tuple[int, float]] = None  # (step, bits per byte) of the last validation


def _setup(config, run_dir, dataset, resume, world: World, progress) -> _Run:
    """Everything before the first step: the checkpoint to resume, the data, the model and its
    wrappers, the optimizer, the metrics; refusals come before anything is built or written."""
    precision = resolve_precision(config.precision, world.device)
    found = _resume_point(run_dir, resume, world)  # before loading data: a refusal should be quick
    problem = backend_refusal(config.model, world.device, compute_dtype(precision))
    if problem:
        raise ValueError(problem)
    changes = run_folder.resume_changes(found, config) if found else ""
    if dataset is None:
        with main_process_first(world):  # rank 0 prepares the cache; the others then read it
            dataset = load_dataset(config.data)
    context = config.model.context
    try:
        check_context(dataset, context)
    except ValueError as err:  # name the file the bytes came from, not only the dataset
        raise ValueError(f"{config.data.path}: {err}" if config.data.path else str(err)) from None
    run_folder.check_vocab(config.model.vocab_size, dataset)
    saved = read_json(TrainConfig, found / "train.json").model if found else None
    config = _positions_from_data(config, dataset, saved)
    if found is not None:
        if saved != config.model:
            raise ValueError(f"cannot resume from {found}: its model config differs from this run's "
                             f"({_model_differences(saved, config.model)})")
    local_batch = config.data.batch_size // world.world_size
    if config.data.batch_size % world.world_size or local_batch % config.grad_accum:
        raise ValueError(f"data.batch_size ({config.data.batch_size}) must split evenly over {world.world_size} "
                         f"process(es) x grad_accum {config.grad_accum}")
    batches = TrainBatches(dataset.train, context, config.data.batch_size, config.seed, world.rank,
                           world.world_size, dataset.example_length)
    schedule = Schedule(config, batches.steps_per_epoch)
    fsdp = world.distributed and config.parallel == "fsdp"

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = SparseTransformer(config.model).to(world.device)
    step, elapsed, state, rng = 0, 0.0, None, None
    if found is not None:
        model_state, state, rng = ckpt.load_state(found, world.rank, verify=False)  # verified when found
        step, elapsed = int(state["step"]), float(state["elapsed"])
        batches.load_state_dict(state["batches"])
        if not fsdp:
            _load_model(model, model_state, False)
    torch.manual_seed(config.seed + 1 + world.rank)  # dropout masks differ between ranks
    if found is not None:
        ckpt.restore_rng(rng)
    wrapped = parallelize(model, config, world)
    if found is not None and fsdp:
        _load_model(model, model_state, True)
    optimizer = build_optimizer(model, config)
    scaler = make_scaler(precision, world.device)
    if found is not None:
        _load_optimizer(model, optimizer, state["optimizer"], fsdp)
        scaler.load_state_dict(state["scaler"]) if state["scaler"] else None

    metrics = Metrics(run_dir, schedule.max_steps, schedule.max_time, step, elapsed, world.main, progress)
    if world.main:
        (run_dir / "train.json").write_text(json.dumps(to_dict(config), indent=2))
        metrics.write(f"{config.model.n_layer} layers, {model.num_parameters():,} parameters, "
                      f"{world.world_size} process(es) on {world.device.type}, {precision}; "
                      f"data {run_folder.describe_data(config, dataset)}; "
                      + (f"resuming from {found.name}" if found else "starting fresh"))
        if changes:
            metrics.write(changes)
        if found and schedule.max_steps and step >= schedule.max_steps:
            metrics.write(f"nothing to train: the run is at step {step:,}, at or past the step limit "
                          f"{schedule.max_steps:,} (raise --steps to train on)")
    return _Run(config, run_dir, world, precision, dataset, model, wrapped, optimizer, scaler, batches, schedule,
                metrics, found, fsdp, step, elapsed, progress)


def _save(run: _Run) -> Path:
    model_state, optim_state = _states(run.model, run.optimizer, run.fsdp)
    world = run.world
    train_state = {"step": run.step, "elapsed": run.elapsed, "optimizer": optim_state,
                   "scaler": run.scaler.state_dict(), "batches": dict(run.batches.state_dict(), step=run.step)}
    return ckpt.save_checkpoint(run.run_dir, run.step, model_state if world.main else None, run.config,
                                train_state if world.main else None, world.rank, world.world_size,
                                run.config.keep_checkpoints)


def _evaluate(run: _Run, split: str) -> tuple[float, int]:
    data = run.config.data
    return evaluate(run.model, getattr(run.dataset, split), run.config.model.context, run.world,
                    stride=data.eval_stride, example_length=run.dataset.example_length, max_bytes=data.eval_bytes,
                    batch_size=data.eval_batch_size, precision=run.precision,
                    progress=run.progress and run.world.main, desc=split)


def _validate(run: _Run) -> float:
    if run.validated is not None and run.validated[0] == run.step:  # the final pass after a periodic one
        run.metrics.write(f"step {run.step}: validation {run.validated[1]:.4f} bits per byte (measured at this step)")
        return run.validated[1]
    bpb, count = _evaluate(run, "validation")
    run.validated = (run.step, bpb)
    run.metrics.log({"split": "validation", "step": run.step, "time": round(run.elapsed, 3), "bits_per_byte": bpb,
                     "bytes": count})
    run.metrics.write(f"step {run.step}: validation {bpb:.4f} bits per byte ({count:,} bytes)")
    return bpb


class _Pending:
    """Steps whose loss and skip flag are still on the device: :meth:`read` fetches them all with one
    wait for the GPU, records the losses in ``result`` and warns about skipped steps."""

    def __init__(self, result: RunResult, metrics: Metrics, max_nonfinite: int):
        self.result, self.metrics, self.max_nonfinite = result, metrics, max_nonfinite
        self.stats: list[tuple[int, StepStats]] = []
        self.nonfinite = 0  # skipped steps in a row, as of the last read

    def add(self, step: int, stats: StepStats) -> None:
        self.stats.append((step, stats))

    def read(self) -> Optional[float]:
        """The loss of the last step added (None if there is none), after reading all of them."""
        if not self.stats:
            return None
        values = torch.stack([torch.stack([s.loss.float(), s.problem.float()]) for _, s in self.stats]).tolist()
        for (step, _), (loss, problem) in zip(self.stats, values):
            self.result.losses.append(loss)
            if problem:
                self.nonfinite += 1
                what = PROBLEMS[int(problem)]
                self.metrics.write(f"warning: non-finite {what} at step {step - 1}; step skipped "
                                   f"({self.nonfinite} in a row, stopping at {self.max_nonfinite})")
                warnings.warn(f"non-finite {what} at step {step - 1}; step skipped")
            else:
                self.nonfinite = 0
        self.stats.clear()
        return values[-1][0]


def _cadence(run: _Run, result: RunResult, on_step) -> tuple[str, bool]:
    """Steps until a limit, a stop request or too many non-finite steps; returns ``(why it stopped,
    whether it was interrupted inside an optimizer update)``. The host reads the GPU's results only
    at log, checkpoint and evaluation steps; several processes agree on stopping at log steps (one
    all-reduce carries the logged loss, stop requests and the time limit)."""
    config, world, metrics, schedule = run.config, run.world, run.metrics, run.schedule
    compiling = compiles(config, world.device)
    step_fn = TrainStep(run.model, run.wrapped, run.optimizer, run.scaler, run.precision, config, run.fsdp,
                        compile=compiling)
    if compiling:
        metrics.write("compiling the model with torch.compile: the first steps take longer (--no-compile: eager)")
    pending = _Pending(result, metrics, config.max_nonfinite)
    prefetch = Prefetcher(iter(run.batches), depth=4)
    tokens_seen, reason, voted, started = 0, None, None, None
    wall0 = last = time.perf_counter()
    run.wrapped.train()
    stop = StopRequest()
    stop.install()
    try:
        while True:
            # Step limits are the same on every process; several agree on the time limit at log steps.
            reason = voted or schedule.stop(run.step, 0.0 if world.distributed else run.elapsed)
            if reason is not None:
                break
            lr = schedule.lr(run.step, run.elapsed)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            data_step, batch = next(prefetch)
            assert data_step == run.step, (data_step, run.step)
            step_fn.updated = False
            started = run.step, ckpt.rng_state()  # for a step a second Ctrl-C cuts short (see below)
            stats = step_fn(batch.to(world.device, non_blocking=True))
            run.step += 1
            started = None
            if compiling and tokens_seen == 0:  # the first step compiled the forward and backward passes
                metrics.write(f"compiled in {time.perf_counter() - last:.0f} s")
            pending.add(run.step, stats)
            now = time.perf_counter()
            run.elapsed += now - last
            last = now
            tokens_seen += batch.numel() * world.world_size
            logged = run.step % config.log_every == 0
            loss = pending.read() if logged else None
            if logged and world.distributed:  # the logged loss, stop requests and time limit, agreed
                time_up = schedule.stop(run.step, run.elapsed) == "time"
                votes = torch.tensor([loss, float(stop.requested), float(time_up)], device=world.device)
                loss, stop_votes, time_votes = all_reduce_mean(votes, world).tolist()
                voted = "interrupted" if stop_votes > 0 else "time" if time_votes > 0 else None
            metrics.step(run.step, run.elapsed, loss, lr, tokens_seen / max(now - wall0, 1e-9), log=logged)
            if pending.nonfinite >= config.max_nonfinite:
                reason = "non-finite"
                break
            if on_step is not None:
                on_step(run.step, stats.loss)
            # One process stops after this step; several after the log step whose all-reduce carried the request.
            if voted == "interrupted" or (stop.requested and not world.distributed):
                metrics.write(f"stop requested{' (' + stop.name + ')' if stop.name else ''}: "
                              f"checkpointing after step {run.step}")
                reason = "interrupted"
                break
            if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                pending.read()  # a checkpoint holds no skipped step
                if pending.nonfinite == 0:
                    result.checkpoint = _save(run)
            if config.eval_every and run.step % config.eval_every == 0:
                result.validation_bits_per_byte = _validate(run)
            last = time.perf_counter()  # checkpoints and evaluation do not count as training time
    except KeyboardInterrupt:
        reason = "interrupted"
        if started is not None and step_fn.updated:  # stopped after the update: the step counts
            run.step = started[0] + 1
        elif started is not None and not step_fn.updating:
            # Stopped inside a step's forward or backward pass: its dropout masks were drawn, so the
            # checkpoint of the step before would hold RNG states that step never saw, and the
            # resumed run would not continue exactly.
            ckpt.restore_rng(started[1])
    finally:
        stop.restore()
        prefetch.close()
    pending.read()
    result.nonfinite = pending.nonfinite
    return reason, step_fn.updating


def _finish(run: _Run, result: RunResult, reason: str, updating: bool, final_eval: bool) -> RunResult:
    """The run summary, the last checkpoint, and unless the run was interrupted or diverged the final
    evaluation, a sample and the metrics plot."""
    config, world, metrics = run.config, run.world, run.metrics
    result.step, result.stopped = run.step, reason
    run_summary = {"split": "summary", "step": run.step, "time": round(run.elapsed, 3), "stopped": reason}
    if world.device.type == "cuda":
        run_summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(world.device) / 2 ** 30, 3)
    metrics.log(run_summary)
    if reason == "non-finite":
        metrics.write(f"stopped: {config.max_nonfinite} non-finite losses in a row; "
                      f"the last good checkpoint is {result.checkpoint}")
    elif updating:
        metrics.write("interrupted during an optimizer update: no checkpoint written for this step")
    elif result.nonfinite == 0 and (result.checkpoint is None
                                    or result.checkpoint.name != f"{ckpt.PREFIX}{run.step:08d}"):
        result.checkpoint = _save(run)
    metrics.close()
    if reason == "interrupted":
        if world.main:
            print(f"interrupted at step {run.step}; continue with --resume (checkpoint {result.checkpoint})")
        return result
    if final_eval and reason != "non-finite":
        metrics.write(f"final evaluation on {run.dataset.name}: "
                      + ("validation and test splits" if config.eval_every else "test split"))
        if config.eval_every:
            result.validation_bits_per_byte = _validate(run)
        bpb, count = _evaluate(run, "test")
        result.test_bits_per_byte, result.test_bytes = bpb, count
        result.test_split_bytes = len(run.dataset.test)
        metrics.log({"split": "test", "step": run.step, "time": round(run.elapsed, 3), "bits_per_byte": bpb,
                     "bytes": count})
        if config.sample_bytes and run.dataset.kind == "text":
            model = run.model
            sampler = _unsharded_copy(model, config.model, world) if run.fsdp else (model if world.main else None)
            if sampler is not None:
                result.sample = sample_bytes(sampler, config.sample_bytes, seed=config.seed,
                                             device=sampler.head.weight.device)
    if world.main:
        plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "metrics.png")
    return result


def replace(config: TrainConfig, **sections) -> TrainConfig:
    """``dataclasses.replace`` for nested sections: ``replace(c, schedule={"steps": 4})``."""
    changes = {k: dataclasses.replace(getattr(config, k), **v) if isinstance(v, dict) else v
               for k, v in sections.items()}
    return dataclasses.replace(config, **changes)
