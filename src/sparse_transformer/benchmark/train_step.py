"""Training-step benchmark: what one optimizer step of the trainer costs, and where the time goes.

For the enwik8-small shape (8 layers, d = 512, 8 heads) at each (context, batch) of
:data:`SHAPES`, for dense (PyTorch SDPA, flash on a GPU), strided l = 128 and fixed l = 128 c = 32
(the preset's 4 distinct summary groups): milliseconds per step, tokens per second and peak GPU
memory of :func:`sparse_transformer.train` itself (data prefetch, schedule, the step; the run's own
settings, so what a user gets), timed over ``--steps`` steps after ``--warmup`` (which absorb
torch.compile). Then ``--profile`` more steps under the PyTorch profiler split the GPU time into
attention forward+backward (the attention kernels) and everything else. In the same process a plain
dense GPT of the same depth and width (nanoGPT-style: SDPA flash, torch.compile, bf16, fused AdamW,
written here, not in the library) sets the reference.

``sparse-transformer bench train`` or ``python benchmarks/train_step.py``; writes
``<out>/train-step-<gpu>.json`` and ``.md``. With ``--label`` the rows say which code ran (to
compare a commit with another: run this file with the other commit's ``src`` first on the path).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import file_stem

# (context, batch): the shapes of the model-step issue (tokens per step 65,536, 73,728, 65,536).
SHAPES = ((2048, 32), (12288, 6), (65536, 1))
# pattern -> model config fields. Dense runs PyTorch's SDPA (flash attention on a GPU): backend "torch".
PATTERNS = {
    "dense": {"pattern": "dense", "backend": "torch"},
    "strided": {"pattern": "strided", "stride": 128},
    "fixed": {"pattern": "fixed", "stride": 128, "summary": 32},
}
# Kernels that are attention: ours, SDPA's flash / memory-efficient / cuDNN ones, FlexAttention's.
ATTENTION_KERNELS = re.compile(r"_fwd_kernel|_dq_kernel|_dkdv_kernel|flash|fmha|attention|sdpa", re.IGNORECASE)


@dataclass
class Row:
    model: str                   # "ours" (the library's trainer) or "gpt" (the plain reference)
    pattern: str
    context: int
    batch: int
    label: str                   # which code ran (--label)
    compile: Optional[bool]      # the run's compile setting (None: the trainer's default)
    ms_per_step: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_gib: Optional[float] = None
    gpu_ms_per_step: Optional[float] = None        # all kernels, from the profiler
    attention_ms_per_step: Optional[float] = None  # attention forward + backward kernels
    other_ms_per_step: Optional[float] = None      # everything else on the GPU
    top_kernels: Optional[list] = None             # (name, ms per step) of the largest kernels
    note: str = ""


class _Timer:
    """``on_step`` hook of :func:`sparse_transformer.train`: times steps ``warmup + 1 ..`` ``warmup
    + steps`` (waiting for the GPU at both ends), then profiles the next ``profile`` steps."""

    def __init__(self, warmup: int, steps: int, profile: int):
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.t0 = self.t1 = None
        self.profiler = None

    def __call__(self, step: int, loss) -> None:
        if step == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif step == self.warmup + self.steps:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()
            if self.profile:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.profiler.start()
        elif step == self.warmup + self.steps + self.profile and self.profiler is not None:
            torch.cuda.synchronize()
            self.profiler.stop()

    @property
    def ms_per_step(self) -> float:
        return (self.t1 - self.t0) / self.steps * 1e3


def _device_time_us(event) -> float:
    """A profiler event's own device time in microseconds (the attribute's name changed in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def split_profile(profiler, steps: int, top: int = 8) -> dict:
    """Per-step GPU milliseconds of all kernels, of the attention kernels and of the rest, and the
    largest kernels, from a profiler that recorded ``steps`` steps."""
    events = [e for e in profiler.key_averages() if _device_time_us(e) > 0]
    total = sum(map(_device_time_us, events)) / steps / 1e3
    attention = sum(_device_time_us(e) for e in events if ATTENTION_KERNELS.search(e.key)) / steps / 1e3
    largest = sorted(events, key=_device_time_us, reverse=True)[:top]
    return dict(gpu_ms_per_step=round(total, 3), attention_ms_per_step=round(attention, 3),
                other_ms_per_step=round(total - attention, 3),
                top_kernels=[(e.key[:90], round(_device_time_us(e) / steps / 1e3, 3)) for e in largest])


def ours(pattern: str, context: int, batch: int, dataset, warmup: int, steps: int, profile: int, label: str,
         compile: Optional[bool] = None) -> Row:
    """One row: the library's trainer on the enwik8-small preset with this shape and pattern."""
    from sparse_transformer import presets
    from sparse_transformer.train import train
    from sparse_transformer.train.loop import replace

    row = Row("ours", pattern, context, batch, label, compile)
    config = presets.get("enwik8-small")
    run = dict(schedule={"steps": warmup + steps + profile, "max_time": None, "warmup_steps": 10},
               data={"batch_size": batch}, model=dict(PATTERNS[pattern], context=context),
               checkpoint_every=0, eval_every=0, sample_bytes=0, log_every=10 ** 6)
    if compile is not None:
        run["compile"] = compile
    config = replace(config, **run)
    timer = _Timer(warmup, steps, profile)
    torch._dynamo.reset()  # each row compiles afresh, as its own run would: no recompile limit carried over
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        try:
            train(config, folder, dataset, progress=False, final_eval=False, on_step=timer)
        except Exception as err:  # recorded (out of memory, a compile error); the next row still runs
            row.note = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
            return row
    row.ms_per_step = round(timer.ms_per_step, 3)
    row.tokens_per_s = round(batch * context / timer.ms_per_step * 1e3)
    row.peak_gib = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if timer.profiler is not None:
        for key, value in split_profile(timer.profiler, profile).items():
            setattr(row, key, value)
    return row


class _Block(nn.Module):
    """A GPT-2 block: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """The reference: a plain dense decoder of the same depth and width (learned positions)."""

    def __init__(self, layers: int, d: int, heads: int, context: int, vocab: int = 256):
        super().__init__()
        self.token, self.position = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def gpt(context: int, batch: int, dataset, warmup: int, steps: int, profile: int, label: str) -> Row:
    """One row: the plain GPT's step (compiled, bf16 autocast, fused AdamW, clip 1.0, no host sync)."""
    from sparse_transformer.data.batches import TrainBatches

    row = Row("gpt", "dense", context, batch, label, True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(8, 512, 8, context).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    compiled = torch.compile(model)
    data = TrainBatches(dataset.train, context + 1, batch)

    def step(i: int) -> None:
        tokens = torch.from_numpy(data.batch(i)).pin_memory().cuda(non_blocking=True).long()
        with torch.autocast("cuda", torch.bfloat16):
            logits = compiled(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup):
            step(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / steps * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for i in range(profile):
                step(warmup + steps + i)
            torch.cuda.synchronize()
    except Exception as err:  # recorded; the next row still runs
        row.note = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
        return row
    row.ms_per_step, row.tokens_per_s = round(ms, 3), round(batch * context / ms * 1e3)
    row.peak_gib = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if profile:
        for key, value in split_profile(profiler, profile).items():
            setattr(row, key, value)
    return row


def _fmt(x, digits=1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def markdown(rows: list[Row], device: str) -> str:
    """One line per row, with each row's speed-up over our dense model and the GPT of its shape and label."""
    lines = [f"Device: {device}. enwik8-small shape (8 layers, d = 512, 8 heads), bf16 autocast; ms per optimizer "
             f"step of the trainer (data, schedule and step), attention / other: GPU ms per step from the profiler.",
             "", "| code | model | pattern | context x batch | compile | ms/step | tokens/s | peak GiB | GPU ms | "
             "attention ms | other ms | vs our dense | vs GPT |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = {(r.label, r.model, r.pattern, r.context): r for r in rows}
    for r in rows:
        dense, ref = key.get((r.label, "ours", "dense", r.context)), key.get((r.label, "gpt", "dense", r.context))
        ratio = [f"{d.ms_per_step / r.ms_per_step:.2f}x" if d and d.ms_per_step and r.ms_per_step else "—"
                 for d in (dense, ref)]
        compile = {None: "default", True: "on", False: "off"}[r.compile]
        lines.append(f"| {r.label} | {r.model} | {r.pattern} | {r.context:,} x {r.batch} | {compile} | "
                     f"{_fmt(r.ms_per_step)} | {_fmt(r.tokens_per_s, 0)} | {_fmt(r.peak_gib, 2)} | "
                     f"{_fmt(r.gpu_ms_per_step)} | {_fmt(r.attention_ms_per_step)} | {_fmt(r.other_ms_per_step)} | "
                     f"{ratio[0]} | {ratio[1]} |" + (f" {r.note}" if r.note else ""))
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=[f"{c}x{b}" for c, b in SHAPES],
                        help="CONTEXTxBATCH items")
    parser.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    parser.add_argument("--compile", choices=("default", "on", "off"), nargs="+", default=["default"],
                        help="our trainer's compile setting(s) to run")
    parser.add_argument("--no-gpt", action="store_true", help="skip the plain GPT reference")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation happens here)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--profile", type=int, default=3, help="profiled steps after the timed ones (0: none)")
    parser.add_argument("--label", default="this code", help="names the code that ran, in every row")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the results")


def _shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", text)
    if not match:
        raise ValueError(f"--shapes: expected CONTEXTxBATCH of positive sizes such as 12288x6, got {text!r}")
    return int(match[1]), int(match[2])


def run_cli(args) -> int:
    # The arguments first: a typo is named on any machine, not hidden behind the GPU check.
    if min(args.warmup, args.steps) < 1 or args.profile < 0:
        raise ValueError("--warmup and --steps must be >= 1 and --profile >= 0")
    shapes = [_shape(s) for s in args.shapes]
    if not torch.cuda.is_available():
        raise ValueError("the training-step benchmark needs a CUDA GPU")
    from sparse_transformer.data import load_stdlib

    dataset = load_stdlib()  # the embedded default: content does not change a step's cost
    device = torch.cuda.get_device_name()
    name = file_stem(device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train-step-{name}.json"
    # Rows of other labels (another commit's run) stay; this label's rows are replaced.
    rows = [Row(**r) for r in json.loads(path.read_text())["rows"] if r["label"] != args.label] if path.exists() else []
    settings = {"default": None, "on": True, "off": False}
    for context, batch in shapes:
        for pattern in args.patterns:
            for compile in args.compile:
                rows.append(ours(pattern, context, batch, dataset, args.warmup, args.steps, args.profile, args.label,
                                 settings[compile]))
                print(json.dumps(asdict(rows[-1])), flush=True)
        if not args.no_gpt:
            rows.append(gpt(context, batch, dataset, args.warmup, args.steps, args.profile, args.label))
            print(json.dumps(asdict(rows[-1])), flush=True)
        torch.cuda.empty_cache()
    import triton
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__)
    path.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
    table = markdown(rows, device)
    path.with_suffix(".md").write_text(table)
    print(table)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
