"""Typed configs: the model, the data, the optimizer, the schedule and a whole training run.

Presets (:mod:`sparse_transformer.presets`) return a full :class:`TrainConfig`; the CLI only
overrides fields (``--set model.dropout=0.1``), with the types declared here. Configs round-trip
through JSON (``to_dict`` / ``from_dict``), which is how checkpoints record what they hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PATTERNS = ("dense", "strided", "fixed")
INTEGRATIONS = ("merged", "interleaved", "split")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
MAX_SEED = 2 ** 63 - 1  # torch seeds are 64-bit unsigned: room left for seed + 1 + rank
MAX_LAYERS = 4096  # far past any model here (the paper's deepest had 128): a config past it is a typo or damage
MAX_CONTEXT = 2 ** 24  # 16x the paper's longest (2^20); past it the position index alone filled memory silently
MAX_WIDTH = 2 ** 24  # d_model, vocab_size: 1,000x GPT-3's width; past 2^31 a weight's size overflowed torch (a traceback)


def _check_number(name: str, value, low: float, *, inclusive: bool = True, high: Optional[float] = None) -> None:
    """A finite real in ``[low, high)`` (``(low, high)`` unless ``inclusive``); NaN and inf never pass."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if inclusive else value > low) and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _or_none(check, name: str, value, *args, expected: str, **kwargs) -> None:
    """``check(name, value, *args, **kwargs)`` for an optional field: None passes, and the error of
    anything else says "NAME must be EXPECTED or None"."""
    if value is None:
        return
    try:
        check(name, value, *args, **kwargs)
    except ValueError:
        raise ValueError(f"{name} must be {expected} or None, got {value!r}") from None


def _int_sizes(value) -> bool:
    """Whether ``value`` is a tuple or list of ints (not bools, not floats a cast would cut)."""
    return isinstance(value, (tuple, list)) and all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in value)


def _check_bool(name: str, value) -> None:
    """A real bool: a string such as "false" from a hand-written config.json is truthy, and was obeyed."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass
class ModelConfig:
    """The network (PAPER.md, "The model" and "Factorized attention")."""

    n_layer: int = 4                # residual blocks
    n_head: int = 4                 # attention heads per block
    d_model: int = 128              # residual width d
    context: int = 256              # longest sequence the model takes (bytes)
    vocab_size: int = 256           # bytes
    pattern: str = "fixed"          # "dense" | "strided" | "fixed" (sized below), or a spec: "local:256+global_tokens:16"
    stride: int = 16                # l: row length (strided) or block length (fixed); position tables' row length
    summary: int = 4                # c: summary slots per block (fixed only)
    distinct: int = 1               # fixed: heads cycle through this many different summary sub-blocks
    integration: str = "merged"     # "merged" (one softmax over A1 u A2), "interleaved" (layers), "split" (heads)
    interleave_ratio: int = 1       # interleaved: this many A1 layers, then one A2 layer (1 = alternate)
    half_ff: bool = False           # feed-forward inner width 2d instead of 4d ("half-size")
    half_qk: bool = False           # query/key width d/2 instead of d ("half-size")
    dropout: float = 0.0            # at the end of each residual branch only
    position_axes: Optional[tuple[int, ...]] = None  # factorized position tables; None: (ceil(N/l), l)
    backend: str = "auto"           # sparse_attention backend ("auto", "torch", "reference", ...)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "d_model", "context", "vocab_size", "stride", "summary",
                     "distinct", "interleave_ratio"):
            _check_count(f"model.{name}", getattr(self, name), 1)
        if self.n_layer > MAX_LAYERS:  # building the blocks would run for hours before any check
            raise ValueError(f"model.n_layer must be <= {MAX_LAYERS:,}, got {self.n_layer:,}")
        if self.context > MAX_CONTEXT:  # 2^31 was ended by the OOM killer, without a word, while building
            raise ValueError(f"model.context must be <= {MAX_CONTEXT:,}, got {self.context:,}")
        for name in ("d_model", "vocab_size"):
            if getattr(self, name) > MAX_WIDTH:
                raise ValueError(f"model.{name} must be <= {MAX_WIDTH:,}, got {getattr(self, name):,}")
        for name in ("half_ff", "half_qk"):
            _check_bool(f"model.{name}", getattr(self, name))
        if not isinstance(self.pattern, str):
            raise ValueError(f"model.pattern must be a string ({PATTERNS} or a spec), got {self.pattern!r}")
        pieces = len(self.pattern_pieces())  # a bad name, spec or size fails here
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"model.integration must be one of {INTEGRATIONS}, got {self.integration!r}")
        if self.integration == "split" and self.n_head < pieces:
            raise ValueError(f"model.integration='split' needs n_head >= {pieces} (one group of heads per part of "
                             f"{self.pattern!r}), got {self.n_head}")
        if self.d_model % self.n_head or self.qk_width % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) and the query/key width ({self.qk_width}) must be "
                             f"divisible by n_head ({self.n_head})")
        _check_number("model.dropout", self.dropout, 0, high=1)  # a string failed as a TypeError
        from .attention import BACKENDS  # checked here, not at the first forward pass after data loading
        if not isinstance(self.backend, str) or (self.backend != "auto" and self.backend not in BACKENDS):
            raise ValueError(f"model.backend must be 'auto' or one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.position_axes is not None:
            # int() read "abc" as an error naming no field, cut 4.5 to 4, and an int failed as a TypeError.
            if not _int_sizes(self.position_axes):
                raise ValueError(f"model.position_axes must be a tuple of int sizes (e.g. (32, 32, 3)) or None, "
                                 f"got {self.position_axes!r}")
            self.position_axes = tuple(int(a) for a in self.position_axes)
            if not self.position_axes or min(self.position_axes) < 1 or math.prod(self.position_axes) < self.context:
                raise ValueError(f"model.position_axes must be positive sizes whose product covers context "
                                 f"{self.context}, got {self.position_axes}")
            if max(self.position_axes) > MAX_CONTEXT:  # one table per axis: 10^30 rows was a torch traceback
                raise ValueError(f"model.position_axes sizes must be <= {MAX_CONTEXT:,}, got {self.position_axes}")

    def attention_pattern(self):
        """The pattern of ``pattern`` (a name sized by ``stride``/``summary``/``distinct``, or a spec)."""
        from .patterns import by_name
        try:
            return by_name(self.pattern, self.stride, self.summary, self.distinct)
        except ValueError as err:
            raise ValueError(f"model.pattern: {err}") from None

    def pattern_pieces(self) -> tuple:
        """The one-part patterns interleaved layers and split heads use (one for dense or a part)."""
        from .patterns import parts
        return parts(self.attention_pattern())

    @property
    def qk_width(self) -> int:
        """Width of the queries and keys: d_model, or half of it in half-size layers."""
        return self.d_model // 2 if self.half_qk else self.d_model

    @property
    def axes(self) -> tuple[int, ...]:
        """Sizes of the factorized position tables (images: H, W, C; streams: rows, columns)."""
        if self.position_axes is not None:
            return self.position_axes
        width = min(self.stride, self.context)
        return (-(-self.context // width), width)


@dataclass
class DataConfig:
    """What to train on and how batches are cut."""

    dataset: str = "stdlib"         # "stdlib" (embedded default) or any name of sparse_transformer.data.NAMES
    path: Optional[str] = None      # the dataset's local copy; with dataset "stdlib": any byte file or folder
    tile: tuple[int, int] = (32, 32)  # (H, W) of picture tiles for dataset "images"
    batch_size: int = 16            # global batch in sequences (all ranks, all accumulation steps)
    eval_stride: Optional[int] = None  # new bytes scored per eval window (None: context // 2)
    eval_bytes: Optional[int] = None   # score at most this many bytes per eval split (None: all)
    eval_batch_size: int = 8        # windows per eval forward pass

    def __post_init__(self):
        # A JSON "32" was read as (3, 2), 32.7 cut to 32, and a number or null failed as a TypeError.
        if not (_int_sizes(self.tile) and len(self.tile) == 2 and min(self.tile) >= 1):
            raise ValueError(f"data.tile must be two sizes >= 1 (H, W), e.g. 32x32, got {self.tile!r}")
        self.tile = tuple(int(t) for t in self.tile)
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if self.path is not None and not isinstance(self.path, str):  # a number failed later, as a TypeError
            raise ValueError(f"data.path must be a file or folder name (a string) or None, got {self.path!r}")
        # Path("") is the current folder: an empty --data would silently train on whatever is there.
        if self.path is not None and not self.path.strip():
            raise ValueError("data.path must name a file or folder, got an empty string")
        from .data.registry import NAMES  # a typo fails here, before a model is built or a run folder touched
        if self.dataset not in NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {', '.join(NAMES)}")
        # A string from a hand-edited train.json failed as a TypeError, a float or true was taken.
        for name in ("batch_size", "eval_batch_size"):
            _check_count(f"data.{name}", getattr(self, name), 1)
        for name in ("eval_stride", "eval_bytes"):
            _or_none(_check_count, f"data.{name}", getattr(self, name), 1, expected="an int >= 1")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (PAPER.md, "Efficiency in the paper")."""

    lr: float = 3.5e-4              # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # not stated in the paper; GPT-2-style choice
    eps: float = 1e-8
    weight_decay: float = 0.01      # on weight matrices only (not biases, norms, embeddings)
    grad_clip: float = 1.0          # global gradient-norm clip (0 disables)

    def __post_init__(self):
        # NaN passes every "< 0" test and would poison the weights on the first step.
        _check_number("optim.lr", self.lr, 0, inclusive=False)
        # A number failed as a TypeError, and a string was read one character per beta.
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers (beta1, beta2), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            _check_number(f"optim.betas[{i}]", beta, 0, high=1)
        self.betas = tuple(float(b) for b in self.betas)
        _check_number("optim.eps", self.eps, 0, inclusive=False)
        _check_number("optim.weight_decay", self.weight_decay, 0)
        _check_number("optim.grad_clip", self.grad_clip, 0)


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay; the run stops at the first limit reached."""

    warmup_steps: int = 5000        # linear warm-up (shortened to a tenth of the run when the run is shorter)
    steps: Optional[int] = None     # stop after this many optimizer steps
    epochs: Optional[float] = None  # stop after this many passes over the training split
    max_time: Optional[float] = None  # stop after this many seconds of training (wall clock)
    min_lr_ratio: float = 0.0       # cosine floor as a fraction of the peak

    def __post_init__(self):
        if self.steps is None and self.epochs is None and self.max_time is None:
            raise ValueError("schedule needs a limit: steps, epochs or max_time")
        # NaN would never stop; a string from a hand-edited train.json failed as a TypeError.
        _or_none(_check_count, "schedule.steps", self.steps, 1, expected="> 0 (an int)")
        for name in ("epochs", "max_time"):
            _or_none(_check_number, f"schedule.{name}", getattr(self, name), 0, inclusive=False,
                     expected="> 0 (a finite number)")
        _check_count("schedule.warmup_steps", self.warmup_steps, 0)
        _check_number("schedule.min_lr_ratio", self.min_lr_ratio, 0)
        if self.min_lr_ratio > 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """A whole training run: model, data, optimizer, schedule and how to execute it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(steps=1000))
    seed: int = 0                   # model init and batch order
    grad_accum: int = 1             # micro-batches per optimizer step (per rank)
    precision: str = "auto"         # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16", "fp16" (loss scaling)
    recompute: bool = False         # activation checkpointing per block (paper: recompute in backward)
    compile: Optional[bool] = None  # torch.compile each block and the loss; None: on with a GPU, off on the CPU
    parallel: str = "ddp"           # multi-process strategy: "ddp" or "fsdp" (FSDP2 fully_shard)
    grad_compress: str = "auto"     # DDP all-reduce: "bf16", "none", "auto" (bf16 with NCCL, none with gloo)
    log_every: int = 10             # steps between metric lines
    eval_every: int = 0             # steps between validation passes (0: only at the end)
    checkpoint_every: int = 0       # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3       # last k checkpoints kept
    max_nonfinite: int = 5          # stop after this many non-finite losses in a row
    sample_bytes: int = 200         # bytes sampled after training (0: none)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.grad_compress not in ("auto", "bf16", "none"):
            raise ValueError(f"grad_compress must be 'auto', 'bf16' or 'none', got {self.grad_compress!r}")
        for name in ("grad_accum", "keep_checkpoints", "max_nonfinite", "log_every"):
            _check_count(name, getattr(self, name), 1)
        _check_bool("recompute", self.recompute)
        if self.compile is not None:
            _check_bool("compile", self.compile)
        # 0 means "off"; a negative interval would match every step (step % -1 == 0).
        for name in ("seed", "eval_every", "checkpoint_every", "sample_bytes"):
            _check_count(name, getattr(self, name), 0)
        # torch seeds are 64-bit: a larger one failed at the first manual_seed with "Overflow when
        # unpacking long long", naming no field (the run seeds seed + 1 + rank, so leave room).
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED:,}], got {self.seed:,}")


def to_dict(config) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls, data: dict):
    """Build config dataclass ``cls`` from a dict made by :func:`to_dict` (nested configs included)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} needs a dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def read_json(cls, path):
    """Config dataclass ``cls`` from JSON file ``path`` (a run's ``train.json``); errors name the file.
    (Invalid JSON said only "Expecting value: line 1 column 1", a JSON list "TrainConfig needs a dict".)"""
    try:
        return from_dict(cls, json.loads(Path(path).read_text()))
    except (ValueError, TypeError) as err:  # bad JSON, bad text encoding or bad fields
        raise ValueError(f"{path}: not a valid {cls.__name__} ({err})") from None


def _parse_value(text: str, hint) -> Any:
    """Turn a command-line string into a value of the declared field type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":
        if text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if origin is tuple:
        kind = args[0]
        try:
            return tuple(kind(part) for part in text.replace("x", ",").split(",") if part)
        except ValueError:
            raise ValueError(f"expected {kind.__name__} values separated by ',' or 'x' (e.g. 32x32), "
                             f"got {text!r}") from None
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"expected {hint.__name__}, got {text!r}") from None
    raise ValueError(f"cannot parse {text!r} as {hint}")


def override(config: TrainConfig, *assignments: str) -> TrainConfig:
    """Apply ``section.field=value`` (or ``field=value`` for run-level fields) overrides.

    Values are parsed with the field's declared type. All assignments are applied before the
    config is validated, so fields checked together (``stride`` and ``summary``) may be set in any
    order; a field set twice keeps its last value.
    """
    changes: dict[tuple[str, ...], dict[str, Any]] = {}  # section path -> {field: value}
    for assignment in assignments:
        section, leaf, value = _parse_assignment(config, assignment)
        changes.setdefault(section, {})[leaf] = value

    def rebuild(owner, path: tuple[str, ...]):
        fields = dict(changes.get(path, {}))
        for f in dataclasses.fields(owner):
            child = getattr(owner, f.name)
            if dataclasses.is_dataclass(child) and any(p[:len(path) + 1] == path + (f.name,) for p in changes):
                fields[f.name] = rebuild(child, path + (f.name,))
        return dataclasses.replace(owner, **fields) if fields else owner  # replace re-runs validation

    result = rebuild(config, ())
    _refuse_unused_sizes(result.model, changes.get(("model",), {}))
    return result


def _refuse_unused_sizes(model: ModelConfig, assigned: dict[str, Any]) -> None:
    """A spec pattern (``local:256+global_tokens:16``) carries its own sizes, so ``stride``, ``summary``
    and ``distinct`` set on the command line next to one would change nothing the user meant; refuse
    them rather than train a model other than the one asked for. Only explicit overrides to other than
    the field's default are refused: a preset's or a saved run's sizes stay valid under any pattern."""
    if model.pattern in PATTERNS:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    unused = [name for name in ("stride", "summary", "distinct")
              if name in assigned and assigned[name] != defaults[name]]
    if not unused:
        return
    named = " and ".join(f"model.{name}={assigned[name]}" for name in unused)
    # stride still sets the position tables' row length; say how to ask for that without it.
    width = min(model.stride, model.context)
    rows = f"; for position tables of rows of {width}, set model.position_axes={-(-model.context // width)}x{width}"
    raise ValueError(f"{named} {'has' if len(unused) == 1 else 'have'} no effect on the attention of "
                     f"model.pattern={model.pattern!r} (a spec carries its own sizes); drop "
                     f"{'it' if len(unused) == 1 else 'them'} or use model.pattern={'strided or ' * (unused == ['stride'])}fixed"
                     + (rows if "stride" in unused and model.position_axes is None else ""))


def _parse_assignment(config: TrainConfig, assignment: str) -> tuple[tuple[str, ...], str, Any]:
    """``section.field=value`` -> (section path, field, parsed value), with one-line errors."""
    if "=" not in assignment:
        raise ValueError(f"override must look like 'model.dropout=0.1', got {assignment!r}")
    key, text = assignment.split("=", 1)
    path = key.strip().split(".")
    owner = config
    for name in path[:-1]:
        owner = getattr(owner, name, None)
        if not dataclasses.is_dataclass(owner):
            raise ValueError(f"unknown config section {name!r} in {key!r}; sections: model, data, optim, schedule")
    leaf = path[-1]
    hints = typing.get_type_hints(type(owner))
    if leaf in hints and dataclasses.is_dataclass(hints[leaf]):  # "model=3": a section, not a value
        raise ValueError(f"{key.strip()!r} is a config section: set one of its fields, e.g. "
                         f"{key.strip()}.{dataclasses.fields(hints[leaf])[0].name}=...")
    if leaf not in hints:
        names = [f.name for f in dataclasses.fields(owner)]
        sections = [n for n in names if dataclasses.is_dataclass(hints[n])]
        raise ValueError(f"unknown field {leaf!r} in {type(owner).__name__}; fields: "
                         f"{[n for n in names if n not in sections]}"
                         + (f"; sections (set as section.field): {', '.join(sections)}" if sections else ""))
    try:
        value = _parse_value(text.strip(), hints[leaf])
    except ValueError as err:  # name the field: "expected int" alone does not say which --set was wrong
        raise ValueError(f"{key.strip()}: {err}") from None
    return tuple(path[:-1]), leaf, value
