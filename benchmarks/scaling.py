"""Data-parallel scaling on one host: the same training run on 1 process and on N (issue 9).

Runs ``sparse-transformer train`` under torchrun with one preset, dataset, global batch, seed and
number of steps: once on 1 process, then on ``--nproc`` processes with each strategy (DDP with
the bf16-compressed gradient all-reduce it uses on NCCL, and FSDP2). From each run's
``metrics.jsonl`` it reports

- steady throughput: tokens per second of training time over the second half of the steps
  (compilation, autotuning and warm-up are in the first half; evaluation and checkpoints are not
  training time),
- scaling efficiency: N-process tokens/s / (N x 1-process tokens/s) (issue 9's target: >= 0.9),
- how far the N-process loss curve is from the 1-process one at the same step (bits per byte):
  with the same global batch they see the same bytes, and dropout is off (``model.dropout=0``
  unless ``--set`` says otherwise: masks depend on the per-process batch shape), so they differ
  only by reduction order and bf16 gradient compression.

Results go to ``benchmarks/results/scaling-<gpu>.{json,md}`` and a loss-curve PNG beside them.

    python benchmarks/scaling.py --dataset gcide --data .data/gcide.txt.gz --steps 300
    python benchmarks/scaling.py --preset tiny --steps 6 --set model.context=64 --out /tmp/s   # CPU, gloo
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

import numpy as np

RESULTS = Path(__file__).parent / "results"


def train(nproc: int, strategy: str, run_dir: Path, args: argparse.Namespace) -> float:
    """One training run under torchrun; returns its wall-clock seconds. Raises with the log's tail."""
    sets = ["log_every=1", "sample_bytes=0", "checkpoint_every=0", "eval_every=0", "model.dropout=0",
            f"data.eval_bytes={args.eval_bytes}", *args.set]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "sparse_transformer", "train", "--preset", args.preset, "--steps", str(args.steps),
           "--out", str(run_dir), "--no-progress", "--parallel", strategy,
           *[x for s in sets for x in ("--set", s)]]
    if args.dataset:
        cmd += ["--dataset", args.dataset]
    if args.data:
        cmd += ["--data", args.data]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.with_name(run_dir.name + ".log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{nproc}-process {strategy} run failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - start


def summarize(run_dir: Path) -> dict:
    """Steady tokens/s and the per-step loss curve of one finished run."""
    from sparse_transformer.train.checkpoint import latest_checkpoint
    from sparse_transformer.train.metrics import read_metrics
    records = read_metrics(run_dir / "metrics.jsonl")
    config = json.loads((latest_checkpoint(run_dir) / "train.json").read_text())
    tokens_per_step = config["data"]["batch_size"] * config["model"]["context"]
    train = [r for r in records if r["split"] == "train"]
    if len(train) < 4:
        raise ValueError(f"{run_dir}: need at least 4 logged training steps to measure throughput, got {len(train)}")
    half = train[len(train) // 2 - 1:]
    steps = half[-1]["step"] - half[0]["step"]
    seconds = half[-1]["time"] - half[0]["time"]
    summary = next((r for r in records if r["split"] == "summary"), {})
    return {"steps": train[-1]["step"], "tokens_per_step": tokens_per_step,
            "steady_s_per_step": seconds / steps, "tokens_per_s": steps * tokens_per_step / seconds,
            "peak_memory_gib": summary.get("peak_memory_gib"),
            "loss_bits": {r["step"]: r["bits_per_byte"] for r in train}}


def compare(one: dict, many: dict, nproc: int) -> dict:
    """Scaling efficiency and loss-curve distance of an N-process run against the 1-process run."""
    common = sorted(set(one["loss_bits"]) & set(many["loss_bits"]))
    diff = np.abs([many["loss_bits"][s] - one["loss_bits"][s] for s in common])
    tail = diff[len(diff) // 2:]
    return {"scaling_efficiency": many["tokens_per_s"] / (nproc * one["tokens_per_s"]),
            "loss_max_abs_diff_bits": float(diff.max()), "loss_mean_abs_diff_bits": float(diff.mean()),
            "loss_mean_abs_diff_bits_second_half": float(tail.mean())}


def plot(curves: dict[str, dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in curves.items():
        steps = sorted(run["loss_bits"])
        ax.plot(steps, [run["loss_bits"][s] for s in steps], label=label, linewidth=1)
    ax.set_xlabel("step (same global batch)")
    ax.set_ylabel("training loss (bits per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [f"# Data-parallel scaling: {report['device']}", "",
             f"`{report['command']}`", "",
             f"preset `{report['preset']}`, {report['steps']} steps, {report['tokens_per_step']:,} tokens per step "
             "(global batch, the same for every run); throughput over the second half of the steps.", "",
             "| run | s/step | tokens/s | scaling efficiency | peak GiB (rank 0) | loss max abs diff vs 1 (bits) "
             "| mean abs diff, 2nd half |",
             "|---|---|---|---|---|---|---|"]
    for label, run in report["runs"].items():
        vs = run.get("vs_one", {})
        eff = f"{vs['scaling_efficiency']:.3f}" if vs else ""
        diff = f"{vs['loss_max_abs_diff_bits']:.4f}" if vs else ""
        tail = f"{vs['loss_mean_abs_diff_bits_second_half']:.4f}" if vs else ""
        peak = f"{run['peak_memory_gib']:.2f}" if run.get("peak_memory_gib") is not None else "n/a"
        lines.append(f"| {label} | {run['steady_s_per_step']:.4f} | {run['tokens_per_s']:,.0f} | {eff} | {peak} "
                     f"| {diff} | {tail} |")
    return "\n".join(lines) + "\n"


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    from sparse_transformer.benchmark import file_stem

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="enwik8-small")
    p.add_argument("--dataset", default=None, help="dataset name, as for `sparse-transformer train`")
    p.add_argument("--data", default=None, help="dataset path, as for `sparse-transformer train`")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the parallel runs")
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=("ddp", "fsdp"))
    p.add_argument("--eval-bytes", type=int, default=65536, help="bytes of the final evaluation (kept short)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override, repeatable")
    p.add_argument("--timeout", type=float, default=540, help="seconds per run")
    p.add_argument("--runs", type=Path, default=Path("runs/scaling"), help="folder for the training runs")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.nproc < 2:
        p.error(f"--nproc must be >= 2 (the parallel runs), got {args.nproc}")
    if args.steps < 8:
        p.error(f"--steps must be >= 8 so that the second half holds enough steps to time, got {args.steps}")
    device = device_name()
    plan = [("1 process", 1, "ddp")] + [(f"{args.nproc} processes, {s}", args.nproc, s) for s in args.strategies]
    runs = {}
    for label, nproc, strategy in plan:
        run_dir = args.runs / re.sub(r"[^a-z0-9]+", "-", label)
        if run_dir.exists():
            raise SystemExit(f"error: {run_dir} exists; remove it or pass another --runs folder")
        wall = train(nproc, strategy, run_dir, args)
        runs[label] = summarize(run_dir)
        runs[label]["wall_s"] = wall
        print(f"{label:24s} {runs[label]['steady_s_per_step']:.4f} s/step  {runs[label]['tokens_per_s']:>12,.0f} tokens/s"
              f"  ({wall:.0f} s wall)", flush=True)
    one = runs["1 process"]
    for label, run in runs.items():
        if label != "1 process":
            run["vs_one"] = compare(one, run, args.nproc)
            print(f"{label:24s} efficiency {run['vs_one']['scaling_efficiency']:.3f}  loss max |diff| "
                  f"{run['vs_one']['loss_max_abs_diff_bits']:.4f} bits", flush=True)
    report = {"device": device, "preset": args.preset, "dataset": args.dataset or args.data or "default",
              "steps": args.steps, "tokens_per_step": one["tokens_per_step"], "nproc": args.nproc,
              "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": runs}
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "scaling-" + file_stem(device)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(runs, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
