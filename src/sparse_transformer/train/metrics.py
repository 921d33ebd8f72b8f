"""What a run reports: a progress bar, metrics as JSON lines, a plot at the end.

Only the main process reports; the others get a silent :class:`Metrics` (``enabled=False``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

LN2 = math.log(2)


class Metrics:
    """Progress bar (tokens/s, loss, bits per byte, lr, ETA) and ``metrics.jsonl`` in ``run_dir``.

    The bar counts steps when the run has a step limit, otherwise seconds of its time limit.
    """

    def __init__(self, run_dir: str | Path, total_steps: Optional[int], max_time: Optional[float],
                 start_step: int = 0, start_time: float = 0.0, enabled: bool = True, bar: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.by_time = total_steps is None and max_time is not None
        self.bar = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._set_aside_after(start_step)
            if bar:
                total = int(max_time) if self.by_time else total_steps
                initial = int(start_time) if self.by_time else start_step
                self.bar = tqdm(total=total, initial=min(initial, total or initial), dynamic_ncols=True,
                                unit="s" if self.by_time else "step", desc="train")
        self.shown_time = float(int(start_time))
        self.shown_loss: Optional[float] = None  # the last loss read from the device

    def _set_aside_after(self, start_step: int) -> None:
        """Keep only the training and validation rows of steps up to ``start_step``, the resumed run's
        past; the rest moves to ``metrics.dropped.jsonl``: steps a resumed run redoes, the earlier
        segment's summary and test rows (the run writes its own), a line cut off by a crash, and on
        a fresh run everything. So ``metrics.jsonl`` is one timeline that never runs back."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [start_step > 0 and _in_past(line, start_step) for line in lines]
        if all(kept):
            return
        keep = [line for line, k in zip(lines, kept) if k]
        dropped = [line for line, k in zip(lines, kept) if not k]
        with open(self.path.with_name("metrics.dropped.jsonl"), "a") as f:
            f.write("".join(line + "\n" for line in dropped))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)
        self.write(f"{len(dropped)} metrics rows that are not this run's past (up to step {start_step}) "
                   f"moved to metrics.dropped.jsonl")

    def log(self, record: dict) -> None:
        """Append one JSON line (``split`` says train / validation / test)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, elapsed: float, loss: Optional[float], lr: float, tokens_per_s: float,
             log: bool) -> None:
        """Advance the bar to ``step`` (completed); with ``loss`` (read from the GPU at log steps only)
        show it, and with ``log`` write the training row."""
        if not self.enabled:
            return
        if self.bar is not None:
            if self.by_time:
                advance = min(elapsed, self.bar.total) - self.shown_time
                if advance >= 1:
                    self.bar.update(int(advance))
                    self.shown_time += int(advance)
            else:
                self.bar.update(step - self.bar.n)
            if loss is not None:
                self.shown_loss = loss
            if self.shown_loss is not None:
                self.bar.set_postfix(loss=f"{self.shown_loss:.3f}", bpb=f"{self.shown_loss / LN2:.3f}", lr=f"{lr:.2e}",
                                     tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if log and loss is not None:
            self.log({"split": "train", "step": step, "time": round(elapsed, 3), "loss": loss,
                      "bits_per_byte": loss / LN2, "lr": lr, "tokens_per_s": tokens_per_s})

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _in_past(line: str, start_step: int) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return (isinstance(row, dict) and row.get("split") in ("train", "validation")
            and isinstance(row.get("step"), int) and row["step"] <= start_step)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out: str | Path) -> Optional[Path]:
    """Bits per byte versus step and versus time (train and evaluation) as a PNG; None if no data."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    records = read_metrics(metrics_path)
    if not records:
        return None
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for split, style in (("train", "-"), ("validation", "o-"), ("test", "s")):
        rows = [r for r in records if r.get("split") == split]
        if not rows:
            continue
        for ax, key in zip(axes, ("step", "time")):
            ax.plot([r[key] for r in rows], [r["bits_per_byte"] for r in rows], style, label=split, markersize=4)
    for ax, label in zip(axes, ("step", "time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("bits per byte (loss / ln 2)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Sparse Transformer training")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    return out
