"""``sparse-transformer sample``: text, image grids or audio from a trained model, with a KV cache."""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
from pathlib import Path

from .arguments import DefaultsHelpFormatter, nonnegative_float, nonnegative_int, positive_int, probability, seed
from .eval import add_load_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text, images or audio from a checkpoint (sparse KV cache)",
                       formatter_class=DefaultsHelpFormatter,
                       description="Sample from a trained model. What comes out follows the model's training "
                                   "data: text (stdout and samples.txt), images (samples.png, and completions.png "
                                   "with --complete-images) or audio (sample-<i>.wav, mu-law decoded).")
    add_load_arguments(p)
    p.add_argument("--n", type=nonnegative_int, default=16, help="unconditional samples (with the prime, if any); 0: none")
    p.add_argument("--steps", type=nonnegative_int, default=None, help="new bytes per sample (default: fill the context)")
    prime = p.add_mutually_exclusive_group()
    prime.add_argument("--prime-file", default=None, help="start every sample with this file's bytes")
    prime.add_argument("--prime-text", default=None, help="start every sample with this text (UTF-8)")
    p.add_argument("--complete-images", type=nonnegative_int, default=0, metavar="K",
                   help="also complete the bottom half of K test images from their top half")
    p.add_argument("--data", default=None,
                   help="images to complete: a raw file of concatenated H*W*C images (default: the test split "
                        "of the dataset the model trained on)")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest bytes (default: all)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample among the likeliest bytes whose probability adds up to p (default: all)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--force", action="store_true", help="replace sample files already in --out")
    p.add_argument("--seed", type=seed, default=0, help="random seed of the sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--decode", default="cudagraph", choices=("eager", "cudagraph", "compile"),
                   help="GPU decode step: captured as a CUDA graph (default, fastest), torch.compile + CUDA graphs "
                        "(slow to compile), or eager; the CPU always runs eagerly")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _train_config(folder: Path):
    from ..config import TrainConfig, read_json
    for candidate in (folder / "train.json", folder.parent.parent / "train.json"):
        if candidate.is_file():
            return read_json(TrainConfig, candidate)
    return None


def _test_images(args, train_config, shape, k: int):
    """The first ``k`` test images ``[k, H*W*C]`` uint8."""
    import numpy as np
    length = math.prod(shape)
    if args.data is not None:
        if not Path(args.data).is_file():
            raise FileNotFoundError(f"--data {args.data}: no such file (a raw file of concatenated "
                                    f"{'x'.join(map(str, shape))} images)")
        raw = np.fromfile(args.data, dtype=np.uint8)
        if len(raw) < k * length:
            raise ValueError(f"--data {args.data} holds {len(raw) // length} whole {'x'.join(map(str, shape))} "
                             f"images, need {k} for --complete-images")
        return raw[:k * length].reshape(k, length)
    if train_config is None:
        raise ValueError("--complete-images needs test images: pass --data (a raw file of images); the checkpoint "
                         "has no train.json naming its dataset")
    from ..train import load_dataset
    test = load_dataset(train_config.data).test
    if len(test) < k * length:
        raise ValueError(f"the test split holds {len(test) // length} images, fewer than --complete-images {k}")
    return np.asarray(test[:k * length]).reshape(k, length)


def _check_prime_file(path: Path) -> None:
    """Refuse a --prime-file that cannot be read, before the model loads. A pipe (``<(command)``) or a
    device is read like a file: ``/dev/null`` is an empty prime, as an empty file is."""
    if path.is_dir():
        raise ValueError(f"--prime-file {path} is a folder; expected a file of bytes")
    if not path.exists():
        raise FileNotFoundError(f"--prime-file {path}: no such file; expected a file of bytes")
    if stat.S_ISSOCK(path.stat().st_mode):  # open() fails on one with "No such device or address"
        raise ValueError(f"--prime-file {path} is a socket; expected a file of bytes (a pipe or a device also do)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"--prime-file {path} cannot be read (permission denied); expected a readable file")


def _read_prime(path: Path, limit: int) -> tuple[bytes, str]:
    """The bytes of --prime-file and their count in words. Of a pipe or a device (``/dev/zero`` never
    ends) at most ``limit`` bytes are read: as many are already too long a prime."""
    if path.is_file():
        prime = path.read_bytes()
        return prime, f"{len(prime):,} bytes"
    with open(path, "rb") as stream:
        prime = stream.read(limit)
    return prime, f"{len(prime):,} bytes" + (" or more" if len(prime) == limit else "")


def _outputs(kind: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The files this command writes into --out that are already there (audio: one file per sample, so
    only those in --out are listed; all --n names, even for text, filled the memory at --n 10**11)."""
    names = []
    if args.n and kind != "audio":
        names.append({"text": "samples.txt", "image": "samples.png"}[kind])
    elif args.n and out.is_dir():
        found = (re.fullmatch(r"sample-(0|[1-9][0-9]*)\.wav", entry.name) for entry in out.iterdir())
        names += sorted((entry[0] for entry in found if entry and int(entry[1]) < args.n),
                        key=lambda name: int(name[7:-4]))
    return names + (["completions.png"] if args.complete_images else [])


def _refuse_overwrite(out: Path, names: list[str], force: bool) -> None:
    folders = [name for name in names if (out / name).is_dir()]  # --force replaces files, never folders
    if folders:
        raise ValueError(f"{out / folders[0]} is a folder; expected no file or a file to replace there: "
                         f"choose another --out")
    there = [name for name in names if (out / name).exists()]
    if there and not force:
        shown = ", ".join(there[:3]) + (f" and {len(there) - 3} more" if len(there) > 3 else "")
        raise ValueError(f"{out} already holds {shown}; pass --force to replace them, or choose another --out")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .. import sample_io
    from ..model import backend_refusal
    from ..parallel import resolve_device
    from ..sampling import generate
    from ..weights import load_model
    from .eval import resolve_checkpoint

    if not args.n and not args.complete_images:
        raise ValueError("nothing to sample: --n is 0 and --complete-images is 0")
    if args.data is not None and not args.complete_images:  # was read by nothing, silently
        raise ValueError("--data has no effect without --complete-images (it holds the images to complete); "
                         "drop it, or add --complete-images K")
    if not args.out.strip():  # Path("") is the current folder: the samples went there
        raise ValueError("--out must name a folder for the samples, got an empty string")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder for the samples")
    if args.prime_file is not None:
        _check_prime_file(Path(args.prime_file))
    folder = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = load_model(folder, device, allow_unverified=args.allow_unverified, backend=args.backend).eval()
    config = model.config
    # A --backend that cannot run here failed at the first forward pass, after --out was made.
    problem = backend_refusal(config, device, model.head.weight.dtype)
    if problem:
        raise ValueError(f"--backend {args.backend}: {problem.removeprefix('model.backend: ')}")
    train_config = _train_config(folder)
    dataset = train_config.data.dataset if train_config is not None else "stdlib"
    kind, shape = sample_io.data_kind(dataset, config.axes, config.context)
    # Everything that can be wrong is checked before the first byte is sampled, not after minutes of it.
    prime = (args.prime_text or "").encode("utf-8")
    where, size = "--prime-text", f"{len(prime):,} bytes"
    if args.prime_file is not None:
        prime, size = _read_prime(Path(args.prime_file), config.context)
        where = f"--prime-file {args.prime_file}"
    if args.n and len(prime) >= config.context:
        raise ValueError(f"{where} is {size}, leaving no room in the model's context "
                         f"{config.context:,}; use a shorter prime")
    steps = args.steps if args.steps is not None else config.context - len(prime)
    if args.n and len(prime) + steps > config.context:
        raise ValueError(f"prime ({len(prime):,} bytes) + --steps {steps:,} = {len(prime) + steps:,} exceeds the "
                         f"model's context {config.context:,}")
    if args.n and kind == "image" and len(prime) + steps != config.context:
        raise ValueError(f"an image needs {config.context} bytes: prime + --steps must fill the context, "
                         f"got {len(prime)} + {steps}")
    if args.complete_images and kind != "image":
        raise ValueError(f"--complete-images needs an image model; this one generates {kind}")
    if prime and max(prime) >= config.vocab_size:
        raise ValueError(f"{where} holds byte value {max(prime)}, outside the model's vocabulary of "
                         f"{config.vocab_size}; expected bytes below {config.vocab_size}")
    _refuse_overwrite(out, _outputs(kind, args, out), args.force)
    originals = _test_images(args, train_config, shape, args.complete_images) if args.complete_images else None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                   compile={"eager": False, "cudagraph": "cudagraph", "compile": True}[args.decode], progress=not args.no_progress)
    # --out is made by the first file written (sample_io), so a run that fails before leaves no folder.

    if args.n:
        tokens = torch.tensor(list(prime), dtype=torch.long).expand(args.n, -1)
        samples = generate(model, tokens, steps, **options).numpy().astype(np.uint8)
        if kind == "text":
            texts = [row.tobytes() for row in samples]
            for i, text in enumerate(texts):  # the file keeps the raw bytes; the terminal gets them escaped
                print(f"==== sample {i} ====\n" + sample_io.printable(text))
            print(f"wrote {sample_io.write_text(texts, out / 'samples.txt')}", file=sys.stderr)
        elif kind == "image":
            images = samples.reshape(-1, *shape)
            grid = sample_io.image_grid(images, math.ceil(math.sqrt(len(images))), scale=sample_io.image_scale(shape[0]))
            print(f"wrote {sample_io.write_png(grid, out / 'samples.png')}", file=sys.stderr)
        else:
            for i, row in enumerate(samples):
                print(f"wrote {sample_io.write_wav(row, out / f'sample-{i}.wav')}", file=sys.stderr)

    if args.complete_images:
        half = (shape[0] // 2) * shape[1] * shape[2]  # the top half of the rows
        top = torch.from_numpy(originals[:, :half].astype(np.int64))
        completed = generate(model, top, config.context - half, **options).numpy().astype(np.uint8)
        pairs = np.stack([originals, completed], 1).reshape(-1, *shape)  # original, completion, ...
        grid = sample_io.image_grid(pairs, 2, scale=sample_io.image_scale(shape[0]))
        print(f"wrote {sample_io.write_png(grid, out / 'completions.png')} (left: original, right: completion "
              f"of the bottom half)", file=sys.stderr)
    return 0
