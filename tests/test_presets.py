"""Presets: the paper's parameter counts, built on the meta device (no memory for 152M weights)."""

import dataclasses

import pytest
import torch

from sparse_transformer import presets
from sparse_transformer.config import ModelConfig, TrainConfig, from_dict, override, to_dict
from sparse_transformer.model import SparseTransformer


def meta_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        return SparseTransformer(config).num_parameters()


@pytest.mark.parametrize("name", sorted(presets.PAPER_PARAMETERS))
def test_paper_parameter_counts_within_3_percent(name):
    count = meta_parameters(presets.get(name).model)
    paper = presets.PAPER_PARAMETERS[name]
    assert abs(count - paper) / paper < 0.03, f"{name}: {count:,} vs paper {paper:,.0f}"


def test_meta_count_matches_a_real_build():
    config = presets.get("tiny").model
    assert meta_parameters(config) == SparseTransformer(config).num_parameters()


def test_paper_hyperparameters():
    c = presets.get("cifar10")
    assert (c.model.n_layer, c.model.n_head, c.model.d_model, c.model.context) == (128, 2, 256, 3072)
    assert c.model.half_ff and c.model.half_qk and c.model.dropout == 0.25 and c.optim.lr == 0.00035
    assert c.schedule.epochs == 120 and c.model.pattern == "strided"
    e = presets.get("enwik8")
    assert (e.model.n_layer, e.model.n_head, e.model.d_model, e.model.context) == (30, 8, 512, 12288)
    assert (e.model.pattern, e.model.stride, e.model.summary, e.model.integration) == ("fixed", 128, 32, "merged")
    assert e.model.dropout == 0.40 and e.schedule.epochs == 80
    i = presets.get("imagenet64")
    assert (i.model.n_layer, i.model.n_head, i.model.d_model, i.model.stride, i.model.context) == (48, 16, 512, 128, 12288)
    assert [presets.get(a).model.context for a in ("audio-65k", "audio-262k", "audio-1m")] == [65536, 262144, 1048576]
    for name in presets.PAPER_PARAMETERS:
        p = presets.get(name)
        assert p.schedule.warmup_steps == 5000 and p.optim.weight_decay == 0.01 and p.optim.grad_clip == 1.0


def test_every_preset_builds_and_unknown_name_fails():
    assert {"tiny", "enwik8-small", "cifar10-small"} <= set(presets.names())
    for name in presets.names():
        assert isinstance(presets.get(name), TrainConfig)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        presets.get("nope")


def test_config_json_round_trip_and_overrides():
    config = presets.get("cifar10")
    assert from_dict(TrainConfig, to_dict(config)) == config
    changed = override(config, "model.dropout=0.1")
    assert changed.model.dropout == 0.1 and config.model.dropout == 0.25
    assert override(config, "schedule.steps=7").schedule.steps == 7
    assert override(config, "model.position_axes=32,32,3").model.position_axes == (32, 32, 3)
    assert override(config, "recompute=false").recompute is False
    assert override(config, "data.eval_bytes=none").data.eval_bytes is None
    with pytest.raises(ValueError, match="expected int"):
        override(config, "model.n_layer=many")
    with pytest.raises(ValueError, match="unknown field"):
        override(config, "model.layers=3")
    with pytest.raises(ValueError, match=r"'model' is a config section: set one of its fields, e.g. model.n_layer="):
        override(config, "model=3")
    with pytest.raises(ValueError, match=r"unknown field 'modl' in TrainConfig; fields: \['seed'.*; sections \(set "
                                         r"as section.field\): model, data, optim, schedule"):
        override(config, "modl=3")
    with pytest.raises(ValueError, match="model.pattern"):
        override(config, "model.pattern=diagonal")
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(config.model, n_head=3)


def test_overrides_checked_together_apply_in_any_order():
    """stride and summary are validated together: setting both must not fail on the order."""
    config = presets.get("enwik8-small")  # stride 64, summary 16, distinct 4
    for sets in (("model.stride=32", "model.summary=8"), ("model.summary=8", "model.stride=32")):
        model = override(config, *sets).model
        assert (model.stride, model.summary, model.distinct) == (32, 8, 4)
    assert override(config, "model.stride=32", "model.stride=256").model.stride == 256  # the last one wins
    both = override(config, "seed=3", "model.dropout=0.2", "data.batch_size=4")
    assert (both.seed, both.model.dropout, both.data.batch_size) == (3, 0.2, 4)
    assert override(config) == config
    with pytest.raises(ValueError, match="distinct \\* summary must be <= stride"):
        override(config, "model.summary=8", "model.stride=16")


def test_sizes_set_next_to_a_spec_pattern_are_refused_not_ignored():
    spec = "model.pattern=local:16+global_tokens:4"
    tiny = presets.get("tiny")  # context 256, fixed stride 16, summary 4
    with pytest.raises(ValueError, match=r"^model.stride=64 has no effect on the attention of model.pattern="
                                         r"'local:16\+global_tokens:4' \(a spec carries its own sizes\); drop it or "
                                         r"use model.pattern=strided or fixed; for position tables of rows of 64, "
                                         r"set model.position_axes=4x64$"):
        override(tiny, spec, "model.stride=64")
    with pytest.raises(ValueError, match=r"^model.summary=8 and model.distinct=2 have no effect .*; drop them or "
                                         r"use model.pattern=fixed$"):
        override(tiny, "model.distinct=2", "model.summary=8", spec)  # in any order
    with pytest.raises(ValueError, match=r"^model.stride=64 has no effect .* or fixed$"):  # no rows: axes are set
        override(presets.get("cifar10"), spec, "model.stride=64")
    with pytest.raises(ValueError, match=r"^model.summary=8 has no effect .*'strided:32'"):  # a spec of strided
        override(tiny, "model.pattern=strided:32", "model.summary=8")
    # Kept: the defaults said out loud, a preset's own sizes, a saved run's config, and the named
    # patterns a sweep sizes alike (docs/results.md: dense, strided, fixed with stride 128, summary 32).
    assert override(tiny, spec, "model.stride=16", "model.summary=4").model.pattern == "local:16+global_tokens:4"
    assert override(presets.get("enwik8-small"), spec).model.summary == 16
    saved = override(presets.get("enwik8-small"), spec)
    assert from_dict(TrainConfig, to_dict(dataclasses.replace(saved, model=dataclasses.replace(
        saved.model, stride=64)))).model.stride == 64
    for pattern in ("dense", "strided"):
        model = override(tiny, f"model.pattern={pattern}", "model.stride=128", "model.summary=32").model
        assert (model.stride, model.summary) == (128, 32)


@pytest.mark.parametrize("assignment,message", [
    ("model.n_layer=many", r"^model.n_layer: expected int, got 'many'"),
    ("data.tile=big", r"^data.tile: expected int values separated by ',' or 'x'"),
    ("data.tile=0x32", r"data.tile must be two sizes >= 1"),
    ("data.path=", "data.path must name a file or folder"),
    ("data.dataset=imagenet", "unknown dataset 'imagenet'; expected one of .*imagenet64"),
    ("model.backend=cuda_magic", "model.backend must be 'auto' or one of"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.eps=0", "optim.eps must be a finite number > 0"),
    ("optim.betas=0.9,1.5", r"optim.betas\[1\] must be a finite number >= 0 and < 1, got 1.5"),
    ("optim.betas=0.9", r"optim.betas must be two numbers"),
    ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number >= 0"),
    ("schedule.max_time=nan", "schedule.max_time must be > 0"),
    ("schedule.epochs=nan", "schedule.epochs must be > 0"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps must be an int >= 0, got -1"),
    ("checkpoint_every=-1", "checkpoint_every must be an int >= 0, got -1"),
    ("eval_every=-5", "eval_every must be an int >= 0"),
    ("sample_bytes=-1", "sample_bytes must be an int >= 0"),
    ("seed=-1", "seed must be an int >= 0, got -1"),
    ("grad_accum=0", "grad_accum must be an int >= 1, got 0"),
])
def test_bad_override_names_the_field_and_what_is_expected(assignment, message):
    with pytest.raises(ValueError, match=message):
        override(presets.get("tiny"), assignment)
