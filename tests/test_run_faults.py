"""Faults of training, resuming, evaluating and sampling found by a second hunt (all on the CPU):
each bad input is one line naming what was wrong and what was expected, a resumed run continues
exactly, and no checkpoint is lost."""

import pytest
import torch

from sparse_transformer.cli import main
from sparse_transformer.config import ModelConfig
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import checkpoint as ckpt
from sparse_transformer.train import train
from sparse_transformer.train import step as step_module
from test_faults import cli_train, data_file, one_error_line, small, text  # noqa: F401 (fixtures)


def argparse_error(capsys, argv) -> str:
    """The error line of a command argparse refuses (exit 2, usage then one ``error:`` line)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def saved_model(tmp_path):
    folder = tmp_path / "model"
    SparseTransformer(ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8, summary=2)).save_pretrained(folder)
    return folder


# A seed torch cannot take ------------------------------------------------------------------------

def test_a_seed_beyond_64_bits_is_named_in_train_and_sample(tmp_path, data_file, capsys):
    """Was `error: Overflow when unpacking long long` (torch.manual_seed), naming neither the flag nor
    what it takes."""
    assert cli_train(data_file, tmp_path / "run", "--steps", "1", "--set", f"seed={2 ** 64}") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "seed must be an int in [0, 9,223,372,036,854,775,807], got 18,446,744,073,709,551,616" in line
    assert not (tmp_path / "run").exists()
    folder = saved_model(tmp_path)
    line = argparse_error(capsys, ["sample", "--checkpoint", str(folder), "--seed", str(2 ** 64),
                                   "--out", str(tmp_path / "o")])
    assert "argument --seed: expected an int in [-2**63, 2**64 - 1]" in line


# Sampling flags and backends refused before --out is made -----------------------------------------

@pytest.mark.parametrize("flags, said", [
    (["--temperature", "-1"], "argument --temperature: expected a finite number >= 0, got '-1'"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number >= 0, got 'nan'"),
    (["--top-p", "0"], "argument --top-p: expected a number in (0, 1], got '0'"),
    (["--top-p", "1.5"], "argument --top-p: expected a number in (0, 1], got '1.5'"),
], ids=["negative-temperature", "nan-temperature", "top-p-0", "top-p-above-1"])
def test_bad_sampling_flags_are_refused_when_parsed_leaving_no_folder(tmp_path, capsys, flags, said):
    """Were refused only by generate(), after the model loaded and --out was created (left empty)."""
    out = tmp_path / "o"
    line = argparse_error(capsys, ["sample", "--checkpoint", str(saved_model(tmp_path)), "--n", "1", "--steps", "4",
                                   "--no-progress", "--out", str(out), *flags])
    assert said in line and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton backend runs on a GPU")
def test_a_backend_that_cannot_run_here_leaves_no_sample_folder(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["sample", "--checkpoint", str(saved_model(tmp_path)), "--n", "1", "--steps", "4", "--no-progress",
                 "--backend", "triton", "--out", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: --backend triton: backend 'triton' cannot run")
    assert not out.exists()


# Checkpoints kept ------------------------------------------------------------------------------

def test_pruning_never_removes_the_checkpoint_just_written(text, tmp_path):
    """A resumed run skips a damaged newer checkpoint; counting it among the last k pruned the
    checkpoint the run had just written (with keep 1, every intact one), leaving nothing to resume."""
    config = small(schedule={"steps": 4}, checkpoint_every=2)
    train(config, tmp_path, text, progress=False, final_eval=False)
    (tmp_path / "checkpoints" / "step-00000004" / "state.pt").write_bytes(b"")  # damaged
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        result = train(small(schedule={"steps": 3}, checkpoint_every=2, keep_checkpoints=1), tmp_path, text,
                       resume=True, progress=False, final_eval=False)
    assert result.checkpoint.name == "step-00000003" and result.checkpoint.is_dir()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == result.checkpoint


def test_a_damaged_checkpoint_replaced_by_a_resumed_run_is_said(text, tmp_path):
    """Was silent: a resumed run that reached the step of a damaged checkpoint it skipped replaced it."""
    config = small(schedule={"steps": 4}, checkpoint_every=2)
    train(config, tmp_path, text, progress=False, final_eval=False)
    (tmp_path / "checkpoints" / "step-00000004" / "state.pt").write_bytes(b"")  # damaged
    with pytest.warns(UserWarning) as said:
        result = train(config, tmp_path, text, resume=True, progress=False, final_eval=False)
    messages = [str(w.message) for w in said]
    assert any("skipping damaged checkpoint" in m for m in messages)
    assert any(m.startswith("replacing damaged checkpoint") and "step 4" in m for m in messages)
    assert result.checkpoint.name == "step-00000004" and ckpt.check(result.checkpoint) is None


def test_checkpoints_past_step_99_999_999_are_the_newest(tmp_path):
    """Names have 8 digits; a ninth sorted step 100,000,000 before step 99,999,999, so it was pruned
    as the oldest and never resumed."""
    model = SparseTransformer(small().model)
    for step in (99_999_999, 100_000_000):
        written = ckpt.save_checkpoint(tmp_path, step, model.state_dict(), small(), {"step": step}, keep=1)
    assert written.is_dir() and [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-100000000"]
    assert ckpt.latest_checkpoint(tmp_path) == written


# Exact resume after a second Ctrl-C ----------------------------------------------------------------

def test_a_second_ctrl_c_inside_a_step_still_resumes_exactly(text, tmp_path, monkeypatch):
    """A second Ctrl-C stops at once, inside a step whose forward pass has drawn its dropout masks;
    the checkpoint of the step before held the RNG state after those draws, so the resumed run's
    losses differed from an uninterrupted run's."""
    config = small(model={"dropout": 0.1}, schedule={"steps": 5})
    full = train(config, tmp_path / "full", text, progress=False, final_eval=False)
    real, calls = step_module.byte_loss, [0]

    def loss(*args, **kwargs):  # the second Ctrl-C lands after step 4's forward pass
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "byte_loss", loss)
    first = train(config, tmp_path / "split", text, progress=False, final_eval=False)
    monkeypatch.setattr(step_module, "byte_loss", real)
    assert first.stopped == "interrupted" and first.checkpoint.name == "step-00000003"
    second = train(config, tmp_path / "split", text, resume=True, progress=False, final_eval=False)
    assert first.losses + second.losses == full.losses


def test_a_ctrl_c_after_the_update_counts_the_step(text, tmp_path, monkeypatch):
    """A second Ctrl-C after a step's optimizer update but before the loop counted it: the checkpoint
    was labelled with the step before while holding the weights after it, so the resumed run took
    that step twice. Now the step counts, and the resumed losses are an uninterrupted run's."""
    config = small(model={"dropout": 0.1}, schedule={"steps": 5})
    full = train(config, tmp_path / "full", text, progress=False, final_eval=False)
    real, calls = torch.optim.AdamW.zero_grad, [0]

    def zero_grad(self, *args, **kwargs):  # the step's last call, after the parameters were written
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", zero_grad)
    first = train(config, tmp_path / "split", text, progress=False, final_eval=False)
    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", real)
    assert first.stopped == "interrupted" and first.checkpoint.name == "step-00000004"
    second = train(config, tmp_path / "split", text, resume=True, progress=False, final_eval=False)
    assert len(first.losses) == 3 and first.losses + second.losses == full.losses[:3] + full.losses[4:]


def test_resuming_a_run_past_its_step_limit_says_nothing_is_trained(text, tmp_path, capsys):
    """Was silent: --resume --steps 2 on a run at step 4 reran the final evaluation only."""
    train(small(schedule={"steps": 4}), tmp_path / "run", text, progress=False, final_eval=False)
    capsys.readouterr()
    again = train(small(schedule={"steps": 2}), tmp_path / "run", text, resume=True, progress=False,
                  final_eval=False)
    assert again.step == 4 and again.losses == []
    assert "nothing to train: the run is at step 4, at or past the step limit 2 (raise --steps" in capsys.readouterr().out


# Paths that are not what they should be ------------------------------------------------------------

def test_data_that_is_a_device_is_not_called_missing(tmp_path, capsys):
    """Was `/dev/null: no such file or folder` for a path that exists."""
    assert cli_train("/dev/null", tmp_path / "run", "--steps", "1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "/dev/null is not a regular file or folder (a device, pipe or socket); expected a file" in line


def test_a_run_folder_under_a_file_is_one_clear_line(tmp_path, data_file, capsys):
    """Was `error: [Errno 20] Not a directory: '.../a-file/run'`."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    assert cli_train(data_file, blocker / "run", "--steps", "1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"run folder {blocker / 'run'} cannot be made: {blocker} is a file; expected a folder" in line
    assert blocker.read_text() == "mine"


def test_a_folder_where_a_sample_file_goes_is_refused_before_sampling(tmp_path, capsys):
    """With --force it was found only when the file was written, after sampling: `[Errno 21] Is a directory`."""
    out = tmp_path / "o"
    (out / "samples.txt").mkdir(parents=True)
    assert main(["sample", "--checkpoint", str(saved_model(tmp_path)), "--n", "1", "--steps", "4", "--no-progress",
                 "--out", str(out), "--force"]) == 2
    assert f"{out / 'samples.txt'} is a folder; expected no file or a file to replace there" in one_error_line(
        capsys.readouterr().err)
    assert (out / "samples.txt").is_dir()


def test_a_config_with_a_billion_layers_is_refused_not_built(tmp_path):
    """Loading a model folder whose config.json says n_layer 10**9 built the blocks (on the meta device)
    for hours before any check; the config now refuses it in one line."""
    import json

    from sparse_transformer.config import MAX_LAYERS
    from sparse_transformer.weights import load_model, save_weights
    with pytest.raises(ValueError, match=f"model.n_layer must be <= {MAX_LAYERS:,}, got 1,000,000,000"):
        ModelConfig(n_layer=10 ** 9)
    folder = tmp_path / "model"
    save_weights(folder, SparseTransformer(small().model).state_dict(), small().model, manifest=False)
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 10 ** 9
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_layer must be <= 4,096"):
        load_model(folder, allow_unverified=True)
