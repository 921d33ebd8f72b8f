"""``sparse-transformer eval``: bits per byte of a saved model on a split, every byte predicted once."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import ALL, DefaultsHelpFormatter, positive_int, positive_int_or_all


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="bits per byte of a checkpoint on the validation or test split",
                       formatter_class=DefaultsHelpFormatter)
    add_load_arguments(p)
    p.add_argument("--split", default="test", choices=("validation", "test"), help="which held-out split to score")
    p.add_argument("--data", default=None, help="a plain byte file (default: the data the run trained on)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the run's; 'stdlib' if unknown)")
    # Checked when parsed: 0 was read as "the default" (via `or`), a negative --stride never ended.
    p.add_argument("--eval-bytes", type=positive_int_or_all, default=None,
                   help="score at most this many bytes, or 'all' for the whole split (default: the run's)")
    p.add_argument("--stride", type=positive_int, default=None, help="new bytes scored per window (default: the run's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per forward pass")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast of the forward pass (auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--allow-unverified`` (eval and sample)."""
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint or save_pretrained folder, or a run folder (its latest good checkpoint)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a folder that has no manifest.json (its files cannot be checked for damage)")
    p.add_argument("--backend", default="auto",
                   help="attention backend for this run, whatever the model trained with: auto (the fastest "
                        "that runs here), torch, triton, flex, fa4 or reference")


def resolve_checkpoint(path: str | Path) -> Path:
    """A folder with model weights: the path itself, or a run folder's latest good checkpoint.
    (Loading it checks its manifest, see :func:`~sparse_transformer.weights.load_model`.)"""
    from ..weights import WEIGHTS_FILE
    from ..train.checkpoint import latest_checkpoint
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    expected = f"expected a checkpoint or save_pretrained folder (with {WEIGHTS_FILE}) or a run folder"
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder; {expected}")
    if not path.is_dir():  # was "<file> holds no model.safetensors ... under <file>/checkpoints"
        hint = f" (pass its folder, {path.parent})" if path.name == WEIGHTS_FILE else ""
        raise ValueError(f"--checkpoint {path} is {'a file' if path.is_file() else 'not a folder'}; {expected}{hint}")
    found = latest_checkpoint(path)
    if found is None:
        raise ValueError(f"--checkpoint {path} holds no {WEIGHTS_FILE} and no intact checkpoint under "
                         f"{path / 'checkpoints'}; {expected}")
    return found


def run(args: argparse.Namespace) -> int:
    from ..config import DataConfig, TrainConfig, read_json
    from ..parallel import World, resolve_device, resolve_precision
    from ..train import evaluate, load_dataset
    from ..train.run_folder import check_vocab
    from ..weights import load_model
    folder = resolve_checkpoint(args.checkpoint)
    data = DataConfig()
    for candidate in (folder / "train.json", folder.parent.parent / "train.json"):
        if candidate.is_file():
            data = read_json(TrainConfig, candidate).data
            break
    if args.dataset is not None or args.data is not None:
        data = DataConfig(dataset=args.dataset or "stdlib", path=args.data, tile=data.tile,
                          eval_stride=data.eval_stride, eval_bytes=data.eval_bytes,
                          eval_batch_size=data.eval_batch_size)
    device = resolve_device(args.device)
    model = load_model(folder, device, allow_unverified=args.allow_unverified, backend=args.backend)
    dataset = load_dataset(data)
    check_vocab(model.config.vocab_size, dataset)
    eval_bytes = {None: data.eval_bytes, ALL: None}.get(args.eval_bytes, args.eval_bytes)
    bpb, count = evaluate(model, dataset.split(args.split), model.config.context, World(device=device),
                          stride=args.stride or data.eval_stride, example_length=dataset.example_length,
                          max_bytes=eval_bytes, batch_size=args.batch_size or data.eval_batch_size,
                          precision=resolve_precision(args.precision, device), progress=not args.no_progress,
                          desc=f"eval {args.split}")
    unit = "bits per dim" if dataset.kind == "image" else "bits per byte"
    whole = "all" if count == len(dataset.split(args.split)) else "a bounded slice:"
    print(f"{folder}: {args.split} {bpb:.4f} {unit} on {dataset.name} ({whole} {count:,} bytes scored)")
    return 0
