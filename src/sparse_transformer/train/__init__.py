"""Training: the loop, checkpoints, metrics and evaluation."""

from .evaluate import evaluate, sample_bytes
from .loop import RunResult, train
from .source import load_dataset

__all__ = ["train", "RunResult", "evaluate", "sample_bytes", "load_dataset"]
