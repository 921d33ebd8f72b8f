"""Faults of configuration as users write it: ``train --set FIELD=VALUE`` and a hand-edited
``train.json`` read by ``eval`` and ``sample``. A wrong type or size is one ValueError (one
``error:`` line from the command) naming the field and what is expected, never a TypeError or a
traceback from inside torch."""

import json
from pathlib import Path

import pytest
import torch

from sparse_transformer import presets
from sparse_transformer.cli import main
from sparse_transformer.config import (DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, from_dict,
                                       override, to_dict)
from sparse_transformer.model import SparseTransformer

SMALL = dict(n_layer=1, n_head=2, d_model=16, context=32, stride=8, summary=2)


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- DataConfig, OptimConfig, ScheduleConfig

@pytest.mark.parametrize("fields,message", [
    # a string from a hand-edited train.json was a TypeError ("'<' not supported ..."), 1.5 and true were taken
    (dict(batch_size="16"), r"data.batch_size must be an int >= 1, got '16'"),
    (dict(batch_size=1.5), r"data.batch_size must be an int >= 1, got 1.5"),
    (dict(eval_batch_size=None), r"data.eval_batch_size must be an int >= 1, got None"),
    (dict(eval_batch_size=True), r"data.eval_batch_size must be an int >= 1, got True"),
    (dict(eval_stride="64"), r"data.eval_stride must be an int >= 1 or None, got '64'"),
    (dict(eval_bytes=2.5), r"data.eval_bytes must be an int >= 1 or None, got 2.5"),
    (dict(eval_bytes=0), r"data.eval_bytes must be an int >= 1 or None, got 0"),
    # "32" was read as (3, 2), 32.7 cut to 32, a number or null was a TypeError
    (dict(tile="32"), r"data.tile must be two sizes >= 1 \(H, W\), e.g. 32x32, got '32'"),
    (dict(tile=32), r"data.tile must be two sizes >= 1 .*got 32"),
    (dict(tile=None), r"data.tile must be two sizes >= 1 .*got None"),
    (dict(tile=(32.7, 32)), r"data.tile must be two sizes >= 1 .*got \(32.7, 32\)"),
    (dict(tile=[True, True]), r"data.tile must be two sizes >= 1"),
    (dict(path=5), r"data.path must be a file or folder name \(a string\) or None, got 5"),
    (dict(path=["a"]), r"data.path must be a file or folder name"),
])
def test_data_config_names_a_field_of_the_wrong_type(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields)


@pytest.mark.parametrize("fields,message", [
    (dict(betas=0.9), r"optim.betas must be two numbers \(beta1, beta2\), got 0.9"),  # was a TypeError
    (dict(betas=None), r"optim.betas must be two numbers"),
    (dict(betas="0.9"), r"optim.betas must be two numbers .*got '0.9'"),  # was read one character a beta
    (dict(betas=("0.9", "0.95")), r"optim.betas\[0\] must be a finite number >= 0 and < 1, got '0.9'"),
])
def test_optim_config_names_betas_of_the_wrong_type(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**fields)


@pytest.mark.parametrize("fields,message", [
    (dict(steps="10"), r"schedule.steps must be > 0 \(an int\) or None, got '10'"),
    (dict(steps=1.5), r"schedule.steps must be > 0 \(an int\) or None, got 1.5"),
    (dict(steps=True), r"schedule.steps must be > 0 \(an int\) or None, got True"),
    (dict(epochs="2"), r"schedule.epochs must be > 0 \(a finite number\) or None, got '2'"),
    (dict(max_time=[60]), r"schedule.max_time must be > 0 \(a finite number\) or None, got \[60\]"),
    (dict(steps=5, min_lr_ratio="0.1"), r"schedule.min_lr_ratio must be a finite number >= 0, got '0.1'"),
    (dict(steps=5, min_lr_ratio=None), r"schedule.min_lr_ratio must be a finite number >= 0, got None"),
])
def test_schedule_config_names_a_field_of_the_wrong_type(fields, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**fields)


def test_right_values_still_pass_and_keep_their_messages():
    data = DataConfig(tile=[16, 8], path=Path("corpus.txt"), eval_stride=None)
    assert data.tile == (16, 8) and data.path == "corpus.txt"  # a Path is kept as text (train.json is JSON)
    assert OptimConfig(betas=[0, 0.5]).betas == (0.0, 0.5)
    assert ScheduleConfig(steps=None, epochs=2, min_lr_ratio=1).min_lr_ratio == 1
    with pytest.raises(ValueError, match=r"schedule.min_lr_ratio must be in \[0, 1\], got 1.5"):
        ScheduleConfig(steps=5, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match=r"schedule.epochs must be > 0"):
        ScheduleConfig(epochs=float("nan"))


def test_a_hand_edited_train_json_is_a_value_error_naming_the_field():
    saved = to_dict(presets.get("tiny"))
    saved["data"]["batch_size"] = "16"
    with pytest.raises(ValueError, match=r"data.batch_size must be an int >= 1, got '16'"):
        from_dict(TrainConfig, saved)


# ---------------------------------------------------------------- sizes torch cannot count

@pytest.mark.parametrize("fields,message", [
    (dict(d_model=10 ** 30), r"model.d_model must be <= 16,777,216, got 1,000,000,000,000,000,000,000,000,000,000"),
    (dict(vocab_size=2 ** 62), r"model.vocab_size must be <= 16,777,216"),
    (dict(position_axes=(10 ** 30, 1)), r"model.position_axes sizes must be <= 16,777,216"),
])
def test_a_width_past_what_torch_can_count_is_refused_not_a_traceback(fields, message):
    with pytest.raises(ValueError, match=message):  # was a TypeError or RuntimeError from torch.empty
        ModelConfig(**{**SMALL, **fields})


def test_train_set_of_a_huge_width_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["train", "--out", str(out), "--steps", "1", "--no-progress",
                            "--set", "model.d_model=1000000000000000000000000000000"],
                   "model.d_model must be <= 16,777,216")
    assert not out.exists()
    assert override(presets.get("tiny"), "model.d_model=256").model.d_model == 256


# ---------------------------------------------------------------- eval and sample on a hand-edited train.json

@pytest.mark.parametrize("text,message", [
    ("{not json", "not a valid TrainConfig (Expecting property name"),  # was the JSON error alone
    ("[]", "not a valid TrainConfig (TrainConfig needs a dict, got list)"),
    (json.dumps({"data": {"batch_size": "16"}}), "data.batch_size must be an int >= 1, got '16'"),  # a traceback
    (json.dumps({"data": {"path": 5}}), "data.path must be a file or folder name"),
])
def test_eval_and_sample_name_a_train_json_that_does_not_read(tmp_path, capsys, text, message):
    torch.manual_seed(0)
    folder = SparseTransformer(ModelConfig(**SMALL)).save_pretrained(tmp_path / "model")
    (folder / "train.json").write_text(text)
    for command in (["eval"], ["sample", "--n", "1", "--steps", "2", "--out", str(tmp_path / "o")]):
        err = one_line_error(capsys, [*command, "--checkpoint", str(folder), "--no-progress"],
                             f"{folder / 'train.json'}: ")
        assert message in err, err
    assert not (tmp_path / "o").exists()


def test_a_missing_dataset_path_names_the_flag_of_train_and_eval_too():
    """`eval --dataset images` without a path was told to pass `--from`, a flag of `data prepare` only."""
    from sparse_transformer.data.registry import load
    with pytest.raises(ValueError, match=r"dataset 'images' needs a path \(--data; --from for data prepare\)"):
        load("images", None)
