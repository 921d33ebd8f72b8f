"""The trainer: learning on real data, exact resume, checkpoints, non-finite losses, the CLI."""

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from sparse_transformer.cli import main
from sparse_transformer.config import DataConfig, ModelConfig, ScheduleConfig, TrainConfig
from sparse_transformer.data import load_stdlib, split_stream
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import checkpoint as ckpt
from sparse_transformer.train import loop, train
from sparse_transformer.train import step as step_module
from sparse_transformer.train.metrics import read_metrics
from sparse_transformer.train.stopping import StopRequest


@pytest.fixture(scope="module")
def text():
    """Two megabytes of the embedded standard-library text: real data, small enough to be quick."""
    return split_stream(np.ascontiguousarray(load_stdlib().train[:2_000_000]), "stdlib-2MB", "text")


def small(**changes) -> TrainConfig:
    config = TrainConfig(
        model=ModelConfig(n_layer=2, n_head=2, d_model=32, context=64, pattern="fixed", stride=8, summary=2),
        data=DataConfig(batch_size=8, eval_bytes=2048, eval_batch_size=8),
        optim=dataclasses.replace(TrainConfig().optim, lr=3e-3),
        schedule=ScheduleConfig(steps=6, warmup_steps=2), log_every=1, sample_bytes=0)
    return loop.replace(config, **changes)


def test_loss_falls_on_real_data(text, tmp_path):
    result = train(small(schedule={"steps": 40}, sample_bytes=20), tmp_path, text, progress=False)
    assert result.stopped == "steps" and result.step == 40
    assert abs(result.losses[0] / math.log(2) - 8.0) < 1e-4  # step 0: uniform bytes
    assert np.mean(result.losses[-5:]) / math.log(2) < 6.0, result.losses
    assert result.test_bits_per_byte < 6.0 and result.test_bytes == 2048
    assert len(result.sample) == 20
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 41))
    assert any(r["split"] == "test" for r in records)
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_final_validation_reuses_a_periodic_one_at_the_same_step(text, tmp_path):
    result = train(small(eval_every=3), tmp_path, text, progress=False)  # 6 steps: validations at 3 and 6
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "validation"]
    assert steps == [3, 6]
    assert result.validation_bits_per_byte is not None and result.test_bits_per_byte is not None


def _interrupt_at(stop):
    def hook(step, loss):
        if step == stop:
            raise KeyboardInterrupt
    return hook


def test_stopped_and_resumed_run_gives_the_same_losses(text, tmp_path):
    config = small(model={"dropout": 0.1}, grad_accum=2)  # dropout: the RNG state must resume too
    full = train(config, tmp_path / "full", text, progress=False, final_eval=False)
    first = train(config, tmp_path / "split", text, progress=False, on_step=_interrupt_at(3))
    assert first.stopped == "interrupted" and first.step == 3 and first.checkpoint.name == "step-00000003"
    second = train(config, tmp_path / "split", text, resume=True, progress=False, final_eval=False)
    assert second.step == 6
    assert first.losses + second.losses == full.losses  # exact on CPU
    a = SparseTransformer.from_pretrained(full.checkpoint)
    b = SparseTransformer.from_pretrained(second.checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _signal_at(stop, signum):
    def hook(step, loss):
        if step == stop:
            os.kill(os.getpid(), signum)  # as a scheduler or `timeout` would, between two steps
    return hook


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(text, tmp_path, signum):
    config = small(checkpoint_every=2)
    full = train(config, tmp_path / "full", text, progress=False, final_eval=False)
    first = train(config, tmp_path / "split", text, progress=False, final_eval=False, on_step=_signal_at(3, signum))
    assert first.stopped == "interrupted" and first.step == 3 and first.checkpoint.name == "step-00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only there while training
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    second = train(config, tmp_path / "split", text, resume=True, progress=False, final_eval=False)
    assert first.losses + second.losses == full.losses


def test_a_second_ctrl_c_interrupts_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_resumed_run_sets_aside_the_metrics_rows_it_redoes(text, tmp_path):
    config = small(checkpoint_every=2, schedule={"steps": 8})
    full = train(config, tmp_path / "full", text, progress=False, final_eval=False)
    train(config, tmp_path / "split", text, progress=False, final_eval=False, on_step=_signal_at(5, signal.SIGTERM))
    # As if killed outright after step 5: its rows reach step 5, its last checkpoint is step 4.
    latest = ckpt.list_checkpoints(tmp_path / "split")[-1]
    assert latest.name == "step-00000005"
    import shutil
    shutil.rmtree(latest)
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # the last line, cut off by the kill
    train(config, tmp_path / "split", text, resume=True, progress=False, final_eval=False)
    rows = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert [r["loss"] for r in rows if r["split"] == "train"] == full.losses
    assert [r["step"] for r in rows if r["split"] == "summary"] == [8]  # one summary: this run's
    dropped = (tmp_path / "split" / "metrics.dropped.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in dropped[:2]] == [5, 5]  # the redone step's train row, summary
    assert dropped[2] == '{"split": "train", "st'


def test_checkpoints_keep_last_k_and_load_without_pickle(text, tmp_path):
    result = train(small(checkpoint_every=1, keep_checkpoints=2), tmp_path, text, progress=False, final_eval=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    model_state, state, rng = ckpt.load_state(result.checkpoint)
    assert state["step"] == 6 and state["batches"]["step"] == 6 and "cpu" in rng
    assert json.loads((result.checkpoint / "train.json").read_text())["model"]["d_model"] == 32
    loaded = SparseTransformer.from_pretrained(result.checkpoint)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model_state.items())


def test_damaged_or_partial_checkpoints_are_skipped(text, tmp_path):
    train(small(checkpoint_every=2, schedule={"steps": 4}), tmp_path, text, progress=False, final_eval=False)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000004"
    (tmp_path / "checkpoints" / ".step-00000006.tmp").mkdir()  # a write that crashed half-way
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="model.safetensors does not match"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    with pytest.raises(ValueError, match="damaged"):
        ckpt.load_state(latest)
    with pytest.warns(UserWarning, match="skipping damaged"):
        resumed = train(small(schedule={"steps": 5}), tmp_path, text, resume=True, progress=False, final_eval=False)
    assert len(resumed.losses) == 3  # continued from step 2
    assert not (tmp_path / "checkpoints" / ".step-00000006.tmp").exists()  # cleaned on the next write


class NanGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward (a finite loss whose gradients are not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_losses_skip_steps_then_stop(text, tmp_path, monkeypatch, poison):
    calls = {"n": 0}
    real = step_module.byte_loss

    def poisoned(logits, tokens, reduction="mean"):
        calls["n"] += 1
        loss = real(logits, tokens, reduction)
        if calls["n"] <= 3:
            return loss
        return loss * float("nan") if poison == "loss" else NanGradient.apply(loss)

    monkeypatch.setattr(step_module, "byte_loss", poisoned)
    with pytest.warns(UserWarning, match=f"non-finite {poison} at step") as caught:
        result = train(small(checkpoint_every=1, max_nonfinite=2), tmp_path, text, progress=False)
    assert [str(w.message).split(";")[0] for w in caught] == [f"non-finite {poison} at step {s}" for s in (3, 4)]
    assert result.stopped == "non-finite" and result.step == 5
    assert all(math.isfinite(x) for x in result.losses[:3])
    assert all(math.isnan(x) == (poison == "loss") for x in result.losses[3:])
    weights = ckpt.load_state(result.checkpoint)[0]
    assert all(torch.isfinite(w).all() for w in weights.values())  # the skipped steps changed nothing
    assert result.checkpoint.name == "step-00000003" and ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    assert result.test_bits_per_byte is None  # no evaluation of a run that diverged


def test_cli_train_and_eval(tmp_path, capsys):
    data = tmp_path / "text.bin"
    data.write_bytes(bytes(load_stdlib().train[:300_000]))
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(data), "--steps", "3", "--out", str(out), "--no-progress",
                 "--set", "model.n_layer=1", "--set", "data.eval_bytes=1024", "--set", "sample_bytes=10"])
    assert code == 0
    text = capsys.readouterr().out
    assert "stopped after 3 steps" in text and "bounded slice: the first 1,024 bytes" in text and "sample:" in text
    assert main(["eval", "--checkpoint", str(out), "--split", "validation", "--eval-bytes", "512"]) == 0
    assert "validation" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out), "--eval-bytes", "all", "--no-progress"]) == 0  # the run's limit lifted
    whole = capsys.readouterr().out
    assert "test" in whole and "(all " in whole and "bytes scored)" in whole
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(out), "--eval-bytes", "some"])
    assert "argument --eval-bytes: expected an int >= 1 or 'all', got 'some'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--set", "model.pattern=spiral"]) == 2
    assert "model.pattern" in capsys.readouterr().err


def test_cli_train_says_all_bytes_when_eval_bytes_covers_the_test_split(tmp_path, capsys):
    data = tmp_path / "text.bin"
    data.write_bytes(bytes(load_stdlib().train[:40_000]))  # test split: 2,000 bytes < eval_bytes 32,768
    code = main(["train", "--preset", "tiny", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "run"),
                 "--no-progress", "--set", "model.n_layer=1", "--set", "sample_bytes=0"])
    assert code == 0
    text = capsys.readouterr().out
    assert "on the test split (all 2,000 bytes)" in text and "bounded slice" not in text


def test_a_run_folder_is_never_trained_into_afresh_and_resume_needs_a_checkpoint(text, tmp_path):
    with pytest.raises(ValueError, match="cannot resume: .*checkpoints holds no intact checkpoint; drop --resume"):
        train(small(), tmp_path, text, resume=True, progress=False)
    first = train(small(schedule={"steps": 2}), tmp_path, text, progress=False, final_eval=False)
    saved = (first.checkpoint / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run .*step-00000002.*--resume"):
        train(small(schedule={"steps": 2}, seed=1), tmp_path, text, progress=False, final_eval=False)
    assert (first.checkpoint / "model.safetensors").read_bytes() == saved  # not overwritten
    weights = first.checkpoint / "model.safetensors"
    weights.write_bytes(saved[:100])
    with pytest.warns(UserWarning, match="skipping damaged"), \
            pytest.raises(ValueError, match=r"no intact checkpoint \(1 damaged: step-00000002\)"):
        train(small(), tmp_path, text, resume=True, progress=False)


def test_images_bring_their_position_axes(tmp_path):
    from sparse_transformer.data import ByteDataset
    images = np.random.default_rng(0).integers(0, 256, 12 * 40, dtype=np.uint8)
    data = ByteDataset("imgs", "image", images, images[:36], images[:36], (2, 2, 3))
    config = small(model={"context": 12, "stride": 6, "pattern": "strided"}, schedule={"steps": 2})
    result = train(config, tmp_path / "a", data, progress=False)
    saved = json.loads((result.checkpoint / "train.json").read_text())
    assert saved["model"]["position_axes"] == [2, 2, 3]  # row, column, channel from the data
    resumed = train(loop.replace(config, schedule={"steps": 3}), tmp_path / "a", data, resume=True, progress=False)
    assert resumed.step == 3  # the saved axes are the ones the data gives: resume accepts them
    with pytest.raises(ValueError, match=r"model.position_axes \(4, 3\) do not match the images of imgs \(2x2x3\)"):
        train(loop.replace(config, model={"position_axes": (4, 3)}), tmp_path / "b", data, progress=False)



def test_an_image_run_saved_with_stream_axes_still_resumes(tmp_path, monkeypatch):
    """Runs from before the axes came from the data saved position_axes None: resume keeps them."""
    from sparse_transformer.data import ByteDataset
    images = np.random.default_rng(0).integers(0, 256, 12 * 40, dtype=np.uint8)
    data = ByteDataset("imgs", "image", images, images[:36], images[:36], (2, 2, 3))
    config = small(model={"context": 12, "stride": 6, "pattern": "strided"}, schedule={"steps": 2})
    with monkeypatch.context() as m:
        m.setattr(loop, "_positions_from_data", lambda config, dataset, saved: config)  # the old trainer
        train(config, tmp_path, data, progress=False, final_eval=False)
    with pytest.warns(UserWarning, match="keeping them"):
        resumed = train(loop.replace(config, schedule={"steps": 3}), tmp_path, data, resume=True, progress=False)
    assert resumed.step == 3


def test_resume_with_another_model_config_names_the_differences(text, tmp_path):
    train(small(schedule={"steps": 2}), tmp_path, text, progress=False, final_eval=False)
    with pytest.raises(ValueError, match=r"model config differs from this run's \(d_model 32 -> 64, stride 8 -> 4\)"):
        train(small(model={"d_model": 64, "stride": 4}), tmp_path, text, resume=True, progress=False)


def test_context_longer_than_the_data_names_the_file(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_bytes(bytes(load_stdlib().train[:200]))
    args = ["train", "--preset", "tiny", "--data", str(short), "--steps", "1", "--out", str(tmp_path / "run"),
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "short.txt: short: the train split holds 180 bytes, fewer than context + 1 = 257 bytes" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match="images are sequences of 2x2x3 = 12 bytes, got context 64"):
        images = np.zeros(12 * 30, np.uint8)
        from sparse_transformer.data import ByteDataset
        train(small(), tmp_path / "img", ByteDataset("imgs", "image", images, images[:24], images[:24], (2, 2, 3)),
              progress=False)


def test_bad_device_and_eval_arguments(tmp_path, capsys):
    for device, message in (("foo", "device must be cpu, cuda or cuda:N, got 'foo'"),
                            ("cuda:99", "cuda:99")):
        assert main(["train", "--preset", "tiny", "--steps", "1", "--device", device, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path), "--stride", "-4"])  # looped forever
    assert "argument --stride: expected an int >= 1, got -4" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "--checkpoint " + str(tmp_path / "missing") + ": no such file or folder" in capsys.readouterr().err


def test_evaluate_rejects_an_empty_batch(text):
    model = SparseTransformer(small().model)
    with pytest.raises(ValueError, match="batch_size and max_bytes must be >= 1, got -1"):
        loop.evaluate(model, text.test, 64, batch_size=-1)


def test_eval_and_sample_refuse_a_damaged_checkpoint_named_directly(text, tmp_path, capsys):
    result = train(small(schedule={"steps": 1}), tmp_path, text, progress=False, final_eval=False)
    weights = result.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # was a SafetensorError traceback
    for command in (["eval"], ["sample", "--no-progress", "--out", str(tmp_path / "s")]):
        assert main(command + ["--checkpoint", str(result.checkpoint)]) == 2
        assert "step-00000001 is damaged: model.safetensors does not match its manifest" in capsys.readouterr().err
