"""Throughput of training batches on one CPU core: bytes of batches cut per second.

Real data only: the embedded standard-library text (train split), optionally a file via --data.
Target: >= 20 million bytes/s on one core. Writes benchmarks/results/dataloader.json.

    python benchmarks/dataloader.py [--context 12288] [--batch-size 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sparse_transformer.data import load_stdlib
from sparse_transformer.data.batches import Prefetcher, TrainBatches


def measure(batches, seconds: float, prefetch: bool) -> float:
    it = Prefetcher(iter(batches), pin=torch.cuda.is_available()) if prefetch else iter(batches)
    total, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, batch = next(it)
        total += batch.nbytes if isinstance(batch, np.ndarray) else batch.numel()
    elapsed = time.perf_counter() - start
    if prefetch:
        it.close()
    return total / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=12288)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--data", default=None, help="a plain byte file to sample from (memory-mapped)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataloader.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    data = np.memmap(args.data, dtype=np.uint8, mode="r") if args.data else load_stdlib().train
    batches = TrainBatches(data, args.context, args.batch_size, seed=0)
    results = {"data": args.data or "stdlib train split", "bytes": int(len(data)), "context": args.context,
               "batch_size": args.batch_size, "cpu": platform.processor() or platform.machine()}
    for prefetch in (False, True):
        rate = measure(batches, args.seconds, prefetch)
        key = "prefetch_thread_bytes_per_s" if prefetch else "main_thread_bytes_per_s"
        results[key] = rate
        print(f"{key}: {rate / 1e6:,.0f} million bytes/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
