"""``sparse-transformer train``: train a preset, with field overrides; under torchrun, on every process."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from .. import presets
from ..config import TrainConfig, override
from .arguments import DefaultsHelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a preset (then print test bits per byte and a sample)",
                       formatter_class=DefaultsHelpFormatter,
                       description="Train a Sparse Transformer. Under `torchrun --nproc-per-node N -m "
                                   "sparse_transformer train ...` each process takes a slice of the global batch.")
    p.add_argument("--preset", default=None, choices=presets.names(),
                   help="(default: tiny; with --resume: the run's own config)")
    p.add_argument("--dataset", default=None, help="a dataset name (see `sparse-transformer data info`): "
                   "stdlib (the embedded default), enwik8, cifar10, imagenet64, audio, gcide, cpython, bytes, images")
    p.add_argument("--data", default=None, help="the dataset's local copy; alone: any byte file or folder "
                   "(.gz decompressed), split 90/5/5")
    p.add_argument("--out", default=None, help="run folder for checkpoints and metrics (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest good checkpoint, with its saved config (data, "
                        "limits, schedule); flags given here change those fields, and the run says so")
    p.add_argument("--force", action="store_true",
                   help="let a fresh run replace the train.json and metrics files an earlier run left in --out")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=float, default=None, help="stop after this many passes over the training split")
    p.add_argument("--time", type=float, default=None, help="stop after this many seconds of training")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in sequences")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                   help="mixed precision (fp16 with loss scaling; default: the preset's, auto: bf16 on a GPU)")
    p.add_argument("--parallel", default=None, choices=("ddp", "fsdp"), help="multi-process strategy")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with a GPU, off on the CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: this process's GPU, else CPU)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set model.dropout=0.1 --set grad_accum=4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The config fields the command line sets explicitly, as ``field=value``."""
    sets = list(args.set)
    if args.dataset is not None:
        sets.append(f"data.dataset={args.dataset}")
    if args.data is not None:  # absolute: a resumed run or `eval` may start from another folder
        sets.append(f"data.path={Path(args.data).expanduser().resolve() if args.data.strip() else args.data}")
    if args.steps is not None or args.epochs is not None or args.time is not None:
        # Explicit limits replace the preset's limits.
        sets += [f"schedule.steps={args.steps}", f"schedule.epochs={args.epochs}", f"schedule.max_time={args.time}"]
    for flag, field in (("batch_size", "data.batch_size"), ("lr", "optim.lr"), ("precision", "precision"),
                        ("parallel", "parallel")):
        if getattr(args, flag) is not None:
            sets.append(f"{field}={getattr(args, flag)}")
    if args.compile is not None:
        sets.append(f"compile={args.compile}")
    return sets


def build_config(args: argparse.Namespace, saved: TrainConfig | None = None) -> TrainConfig:
    """The command line's overrides (each one type-checked) applied to ``saved`` (the config of the
    run that ``--resume`` continues), else to the preset. With ``saved``, an explicit ``--preset``
    must describe the saved run's model."""
    sets = _overrides(args)
    if saved is None:
        return override(presets.get(args.preset or "tiny"), *sets)
    if args.preset is not None:
        model = override(presets.get(args.preset), *sets).model
        if model.position_axes is None:  # image runs take theirs from the data
            model = dataclasses.replace(model, position_axes=saved.model.position_axes)
        if model != saved.model:
            raise ValueError(f"--preset {args.preset} (with this command's overrides) is not the model of the run "
                             f"being resumed; drop --preset to continue that run with its own config")
    return override(saved, *sets)


def run(args: argparse.Namespace) -> int:
    from ..train import train  # torch-heavy imports only when training
    from ..train.run_folder import saved_config
    out = args.out or f"runs/{args.preset or 'tiny'}"
    config = build_config(args, saved_config(out) if args.resume else None)
    result = train(config, out, resume=args.resume, device=args.device, progress=not args.no_progress,
                   force=args.force)
    code = {"non-finite": 1, "interrupted": 130}.get(result.stopped, 0)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return code
    print(f"stopped after {result.step} steps ({result.stopped}); checkpoint: {result.checkpoint}")
    if result.validation_bits_per_byte is not None:
        print(f"validation: {result.validation_bits_per_byte:.4f} bits per byte")
    if result.test_bits_per_byte is not None:
        bounded = (f" (a bounded slice: the first {result.test_bytes:,} bytes)"
                   if result.test_bytes < result.test_split_bytes else f" (all {result.test_bytes:,} bytes)")
        print(f"test: {result.test_bits_per_byte:.4f} bits per byte on the test split{bounded}")
    if result.sample is not None:
        from ..sample_io import printable
        print("sample:\n" + printable(result.sample))
    return code
