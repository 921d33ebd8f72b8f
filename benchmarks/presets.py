"""One training step of each paper preset at its paper context length: does it fit, how fast.

For each preset: build the model on the GPU (recompute as the preset says, bf16 autocast, AdamW),
run warm-up steps, then time ``--steps`` full steps (forward, backward, clip, optimizer) on real
bytes (windows of the embedded standard-library text; content does not change cost) with
``--batch-size`` sequences per process (default 1). Each preset runs in its own subprocess with a
time limit, so an out-of-memory or a slow backend is recorded and the next preset still runs.
With ``--nproc N`` that subprocess is torchrun with N processes, one per GPU, and the model is
wrapped by ``--parallel`` (FSDP2 shards parameters, gradients and optimizer state); peak memory is
reported for every process.

    python benchmarks/presets.py                      # all paper presets, JSON to results/presets-<gpu>.json
    python benchmarks/presets.py --presets enwik8 cifar10 --steps 3
    python benchmarks/presets.py --presets tiny --device cpu   # a smoke test without a GPU
    python benchmarks/presets.py --presets imagenet64 --nproc 2 --parallel fsdp   # one step sharded on 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PAPER = ["cifar10", "enwik8", "imagenet64", "audio-65k", "audio-262k", "audio-1m"]


def one(name: str, device: str, batch_size: int, steps: int, backend: str, recompute: str, parallel: str,
        sets: list[str]) -> dict:
    """Measure preset ``name`` in this process (one of torchrun's when there are several); returns a
    JSON-ready record (complete on rank 0)."""
    import numpy as np
    import torch

    from sparse_transformer import presets
    from sparse_transformer.config import override
    from sparse_transformer.data import load_stdlib
    from sparse_transformer.data.batches import TrainBatches
    from sparse_transformer.model import SparseTransformer, byte_loss
    from sparse_transformer.parallel import (all_reduce_sum, autocast, close_world, init_world, main_process_first,
                                         parallelize, resolve_precision)
    from sparse_transformer.train.loop import build_optimizer, replace

    config = presets.get(name)
    config = override(config, *sets)
    if recompute != "preset":
        config = replace(config, recompute=recompute == "on")
    config = replace(config, model={"backend": backend}, parallel=parallel)
    world = init_world(None if device == "cuda" else device)
    dev = world.device
    precision = resolve_precision("auto", dev)
    context = config.model.context
    with main_process_first(world):  # rank 0 prepares the embedded default's cache, the others read it
        text = load_stdlib().train
    data = np.tile(text, -(-(context + 1) // len(text))) if len(text) <= context else text
    batches = TrainBatches(data, context, batch_size * world.world_size, seed=0, rank=world.rank,
                           world_size=world.world_size)
    torch.manual_seed(0)
    model = SparseTransformer(config.model).to(dev)
    record = {"preset": name, "context": context, "batch_size": batch_size, "parameters": model.num_parameters(),
              "precision": precision, "recompute": config.recompute, "backend": backend,
              "pattern": f"{config.model.pattern} l={config.model.stride}", "processes": world.world_size,
              "parallel": parallel if world.distributed else "none",
              "overrides": sets, "n_layer": config.model.n_layer, "d_model": config.model.d_model}
    wrapped = parallelize(model, config, world)
    optimizer = build_optimizer(model, config)

    def step(i: int) -> float:
        x = torch.from_numpy(batches.batch(i)).to(dev).long()
        with autocast(precision, dev):
            loss = byte_loss(wrapped(x), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    record["first_loss_bits"] = step(0) / np.log(2)  # includes warm-up (autotuning, allocation)
    sync()
    record["first_step_s"] = time.perf_counter() - start
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
    record["s_per_iter"] = float(np.median(times))
    record["tokens_per_s"] = batch_size * world.world_size * context / record["s_per_iter"]
    if dev.type == "cuda":
        # every process's peak, gathered as a sum of one-hot rows
        peaks = torch.zeros(world.world_size, device=dev)
        peaks[world.rank] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        peaks = all_reduce_sum(peaks, world).tolist()
        record["peak_memory_gib"] = max(peaks)
        record["peak_memory_gib_per_process"] = peaks
        record["gpu"] = torch.cuda.get_device_name(dev)
    close_world(world)
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=PAPER)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per process")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per preset, started by torchrun")
    p.add_argument("--parallel", default="fsdp", choices=("ddp", "fsdp"), help="strategy when --nproc > 1")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    p.add_argument("--backend", default="auto", help="sparse_attention backend")
    p.add_argument("--recompute", default="preset", choices=("preset", "on", "off"))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override applied to every preset, e.g. --set model.n_layer=64")
    p.add_argument("--timeout", type=float, default=150, help="seconds per preset")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/presets-<gpu>.json)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one preset, print JSON
    return p


def measure(name: str, args: argparse.Namespace, sets: list[str]) -> dict:
    """Measure preset ``name`` with overrides ``sets`` in a subprocess (torchrun for several
    processes) with a time limit; a failure is a record with an ``error``."""
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    cmd = [*launcher, str(Path(__file__).resolve()), "--one", name, "--device", args.device,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--backend", args.backend,
           "--recompute", args.recompute, "--parallel", args.parallel, *[x for s in sets for x in ("--set", s)]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"preset": name, "overrides": sets, "error": f"timed out after {args.timeout:.0f} s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][7:])
    return {"preset": name, "overrides": sets, "error": failure(done.stdout + done.stderr),
            "log_tail": (done.stdout + done.stderr).splitlines()[-40:]}


def failure(log: str) -> str:
    """The line of a failed run's log that says why: out of memory, else the last exception of a
    worker (torchrun ends with its own ChildFailedError and a banner, which say nothing)."""
    if "out of memory" in log.lower():
        return "out of memory"
    exception = re.compile(r"\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b")  # torchrun prefixes [rankN]:
    errors = [line.strip() for line in log.splitlines() if exception.match(line)]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    workers = [line for line in errors if line.startswith("[rank")]  # the cause, not the launcher's report
    return (workers or errors or lines or ["no output"])[-1]


def describe(record: dict) -> str:
    """One line for the console."""
    if "error" in record:
        return f"{record['preset']:12s} FAILED: {record['error']}"
    mem = f"{record['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in record else "n/a"
    return (f"{record['preset']:12s} context {record['context']:>9,}  {record['parameters'] / 1e6:7.1f}M params  "
            f"{record['s_per_iter']:.3f} s/iter  peak {mem}  (first step {record['first_step_s']:.1f} s)")


def results_path(args: argparse.Namespace, results: list[dict], prefix: str) -> Path:
    """``--out``, else ``benchmarks/results/<prefix>-<gpu>[-x<nproc>-<parallel>].json``."""
    from sparse_transformer.benchmark import file_stem

    if args.out:
        return Path(args.out)
    gpu = next((r["gpu"] for r in results if "gpu" in r), args.device)
    stem = f"{prefix}-" + file_stem(gpu)
    if args.nproc > 1:
        stem += f"-x{args.nproc}-{args.parallel}"
    return Path(__file__).parent / "results" / f"{stem}.json"


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.one:
        record = one(args.one, args.device, args.batch_size, args.steps, args.backend, args.recompute, args.parallel,
                     args.set)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(record), flush=True)
        return
    results = []
    for name in args.presets:
        results.append(measure(name, args, args.set))
        print(describe(results[-1]), flush=True)
    out = results_path(args, results, "presets")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
