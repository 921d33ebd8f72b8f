"""Fault injection (issue 26): every bad input gets a one-line error, nothing hangs, nothing is
overwritten, nothing is silently wrong. One section per kind of fault; all on the CPU."""

import dataclasses
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from local_http import LocalServer, Served
from sparse_transformer.cli import main
from sparse_transformer.config import DataConfig, ModelConfig, ScheduleConfig, TrainConfig
from sparse_transformer.data import download as download_module
from sparse_transformer.data import load_stdlib, split_stream
from sparse_transformer.data.download import download
from sparse_transformer.data.text import ENWIK8, load_enwik8
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import checkpoint as ckpt
from sparse_transformer.train import evaluate, loop, train
from sparse_transformer.weights import load_model, write_manifest


@pytest.fixture(scope="module")
def text():
    """Half a megabyte of the embedded standard-library text."""
    return split_stream(np.ascontiguousarray(load_stdlib().train[:500_000]), "stdlib-500k", "text")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "text.bin"
    path.write_bytes(bytes(load_stdlib().train[:100_000]))
    return path


def small(**changes) -> TrainConfig:
    config = TrainConfig(
        model=ModelConfig(n_layer=1, n_head=2, d_model=32, context=64, pattern="fixed", stride=8, summary=2),
        data=DataConfig(batch_size=4, eval_bytes=256, eval_batch_size=4),
        schedule=ScheduleConfig(steps=3, warmup_steps=1), log_every=1, sample_bytes=0)
    return loop.replace(config, **changes)


def cli_train(data, out, *extra):
    """``sparse-transformer train`` on a one-layer tiny model: a few seconds."""
    return main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--no-progress",
                 "--set", "model.n_layer=1", "--set", "sample_bytes=0", "--set", "data.eval_bytes=256", *extra])


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one line, ``error: ...``, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. Two trainings into one run folder ---------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from sparse_transformer.parallel import World
    from sparse_transformer.train.run_folder import hold
    with hold(sys.argv[1], World()):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_training_on_a_folder_in_use_is_refused_at_once_and_a_dead_holder_leaves_no_lock(
        tmp_path, data_file, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        start = time.perf_counter()
        assert cli_train(data_file, run, "--steps", "1") == 2
        assert time.perf_counter() - start < 10  # at once: no waiting on the lock
        line = one_error_line(capsys.readouterr().err)
        assert f"run folder {run} is in use by another training (pid {holder.pid} on " in line
        assert snapshot(run) == before  # nothing written, nothing deleted
    finally:
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait()
    assert cli_train(data_file, run, "--steps", "1") == 0  # the dead process's lock is gone
    assert (run / "checkpoints" / "step-00000001").is_dir()


def test_the_lock_is_held_through_the_final_evaluation_and_released_on_errors(text, tmp_path, monkeypatch):
    from filelock import FileLock, Timeout
    seen = []
    real = loop.evaluate

    def probing(*args, **kwargs):  # a second locker during the final evaluation must fail
        try:
            FileLock(tmp_path / ".lock").acquire(timeout=0)
            seen.append("free")
        except Timeout:
            seen.append("held")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", probing)
    train(small(), tmp_path, text, progress=False)
    assert seen == ["held"]
    monkeypatch.setattr(loop, "evaluate", real)
    with pytest.raises(ValueError, match="model config differs"):  # an error after the lock was taken
        train(small(model={"d_model": 64}), tmp_path, text, resume=True, progress=False)
    lock = FileLock(tmp_path / ".lock")
    lock.acquire(timeout=0)  # released on that exit path too
    lock.release()


# 2. A wrong download of plausible size ---------------------------------------------------------

TEXT = b"<mediawiki>" + bytes(np.random.default_rng(1).integers(0, 256, 20_000 - 11, dtype=np.uint8))


def zipped(data: bytes) -> bytes:
    import io
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr("enwik8", data)
    return buffer.getvalue()


def test_a_wrong_download_of_the_right_size_never_enters_the_cache(tmp_path):
    good = zipped(TEXT)
    wrong = zipped(TEXT[:-1] + bytes([TEXT[-1] ^ 1]))  # same size, one bit off
    assert len(wrong) == len(good)
    spec = replace(ENWIK8, size=len(TEXT), md5=hashlib.md5(TEXT).hexdigest(),
                   sha256=hashlib.sha256(TEXT).hexdigest(), archive_size=len(good))
    served = Served(files={"/dc/enwik8.zip": wrong})
    kept = tmp_path / "cache" / "downloads" / "enwik8.zip"
    with LocalServer(served) as url:
        spec = replace(spec, url=f"{url}/dc/enwik8.zip")
        with pytest.raises(ValueError, match="rejected and deleted: .*sha256 differs"):
            load_enwik8(cache=tmp_path / "cache", spec=spec, progress=False)
        assert not kept.exists()  # checked before it was published
        served.files["/dc/enwik8.zip"] = good  # the next prepare fetches again and succeeds
        assert bytes(load_enwik8(cache=tmp_path / "cache", spec=spec, progress=False).test) == TEXT[19_000:]
        # A wrong file published by an earlier version is moved aside and fetched again.
        kept.write_bytes(wrong)
        (tmp_path / "cache" / "enwik8" / "manifest.json").unlink()
        assert len(load_enwik8(cache=tmp_path / "cache", spec=spec, progress=False).train) == 18_000
    assert kept.read_bytes() == good and (kept.parent / "enwik8.zip.rejected-1").read_bytes() == wrong


# 3 and 13. A server that never answers, and no network ------------------------------------------

def test_a_server_that_never_answers_fails_soon_saying_what_is_retried(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel's backlog) and never answers
    said = []
    start = time.perf_counter()
    try:
        with pytest.raises(ConnectionError, match=r"could not reach 127.0.0.1 \(no answer within 0.2 s\); "
                                                  r"gave up after 3 attempts"):
            download(f"http://127.0.0.1:{silent.getsockname()[1]}/f.bin", tmp_path / "f.bin", timeout=0.2,
                     retries=2, retry_delay=0.05, progress=False, log=said.append)
    finally:
        silent.close()
    assert time.perf_counter() - start < 5
    assert said == [f"127.0.0.1: no answer within 0.2 s; retrying in 0.05 s (attempt {i} of 3)" for i in (2, 3)]
    assert not (tmp_path / "f.bin.part").exists() or (tmp_path / "f.bin.part").stat().st_size == 0
    # The defaults give up within 30 s: (retries + 1) timeouts plus the pauses between them.
    defaults = {k: v.default for k, v in __import__("inspect").signature(download).parameters.items()}
    assert (defaults["retries"] + 1) * defaults["timeout"] + defaults["retries"] * defaults["retry_delay"] <= 30


def test_a_slow_name_lookup_still_gives_up_within_the_patience(tmp_path, monkeypatch):
    clock = [0.0]

    def slow_lookup(request, timeout=None):  # getaddrinfo is not bounded by the socket timeout
        clock[0] += 12.0
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(download_module.urllib.request, "urlopen", slow_lookup)
    monkeypatch.setattr(download_module, "time", types.SimpleNamespace(sleep=lambda s: None,
                                                                       monotonic=lambda: clock[0]))
    with pytest.raises(ConnectionError, match=r"could not reach h.example \(the host name could not be resolved"):
        download("http://h.example/f", tmp_path / "f", progress=False, log=lambda text: None)
    assert clock[0] == 24  # two lookups of 12 s, not four: a third would end past 30 s


def test_no_network_during_data_prepare_is_one_line_naming_the_host_and_from(tmp_path, monkeypatch, capsys):
    def no_network(request, timeout=None):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(download_module.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(download_module, "time", types.SimpleNamespace(sleep=lambda s: None, monotonic=time.monotonic))
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path))
    assert main(["data", "prepare", "enwik8"]) == 2
    err = capsys.readouterr().err
    retries = [line for line in err.splitlines() if "retrying" in line]
    assert len(retries) == 3 and retries[0].startswith("mattmahoney.net: the host name could not be resolved")
    line = one_error_line("\n".join(x for x in err.splitlines() if x not in retries))
    assert "could not reach mattmahoney.net (the host name could not be resolved" in line
    assert "`sparse-transformer data prepare enwik8 --from enwik8.zip`" in line and "resume" not in line
    assert not list((tmp_path / "downloads").glob("*"))  # no .part file was made


# 4. The data file changes under a running training ----------------------------------------------

def test_training_never_reads_the_users_file_in_place(tmp_path, data_file):
    from sparse_transformer.train import load_dataset
    dataset = load_dataset(DataConfig(path=str(data_file)))
    assert Path(dataset.train.filename) != data_file  # a private copy: the run cannot be cut off under it

    def truncate(step, loss):
        if step == 1:
            data_file.write_bytes(b"")  # a bus error when the file was memory-mapped in place

    result = train(small(data={"path": str(data_file)}), tmp_path / "run", progress=False, on_step=truncate)
    assert result.step == 3 and result.test_bits_per_byte is not None


# 5 and 11. A resumed run continues the run that was stopped --------------------------------------

def test_resume_refuses_other_data_naming_both(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    assert cli_train(data_file, run, "--steps", "1") == 0
    capsys.readouterr()
    other = tmp_path / "other.bin"
    other.write_bytes(data_file.read_bytes()[::-1])
    before = snapshot(run)
    assert cli_train(other, run, "--resume", "--steps", "2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"it trained on dataset 'stdlib' from {data_file}, this run names dataset 'stdlib' from {other}" in line
    assert snapshot(run) == before  # train.json not rewritten


def test_resume_keeps_the_runs_limits_and_says_what_the_command_line_changes(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    assert cli_train(data_file, run, "--steps", "2") == 0
    capsys.readouterr()
    # Without --steps the run keeps its own limit (not the preset's 90 s, not a new warm-up) ...
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stopped after 2 steps (steps)" in out and "resuming with changes" not in out
    # ... and a limit given here changes it, said in one line.
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming with changes: schedule.steps 2 -> 3" in out and "stopped after 3 steps" in out
    saved = json.loads((ckpt.latest_checkpoint(run) / "train.json").read_text())
    assert saved["schedule"]["steps"] == 3 and saved["model"]["n_layer"] == 1 and saved["sample_bytes"] == 0
    assert main(["train", "--out", str(run), "--resume", "--preset", "enwik8-small"]) == 2
    assert "--preset enwik8-small (with this command's overrides) is not the model of the run being resumed" \
        in capsys.readouterr().err


# 6. One line where a traceback was, and nothing written ------------------------------------------

def test_bad_run_arguments_are_one_line_and_write_nothing(tmp_path, data_file, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"mine")
    assert cli_train(data_file, a_file, "--steps", "1") == 2
    assert f"run folder {a_file} is a file" in one_error_line(capsys.readouterr().err)
    assert a_file.read_bytes() == b"mine"
    run = tmp_path / "run"
    for extra, message in ((["--set", "model.vocab_size=2"], "model.vocab_size 2 does not cover the data: the "
                                                             "train split of text holds byte value"),
                           (["--epochs", "1e308"], "schedule.epochs 1e+308 is more steps than can be counted"),
                           # Trained as if the sizes were never given (the spec carries its own).
                           (["--set", "model.pattern=local:16+global_tokens:4", "--set", "model.stride=64"],
                            "model.stride=64 has no effect on the attention of "
                            "model.pattern='local:16+global_tokens:4' (a spec carries its own sizes)")):
        assert cli_train(data_file, run, *extra) == 2
        assert message in one_error_line(capsys.readouterr().err)
        assert not run.exists()  # refused before anything was built or written


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoint(tmp_path, data_file, capsys, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step-00000002" in str(f):  # write part of the file, then fail as torch does on ENOSPC
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1040")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    assert cli_train(data_file, run, "--steps", "3", "--set", "checkpoint_every=1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not write checkpoint step-00000002" in line and "unexpected pos" in line
    assert "the earlier checkpoint step-00000001 is intact: continue from it with --resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]  # no partial folder left
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "stopped after 3 steps" in capsys.readouterr().out


def test_resume_falls_back_when_a_checkpoint_matches_its_manifest_but_does_not_load(text, tmp_path):
    train(small(checkpoint_every=1), tmp_path, text, progress=False, final_eval=False)
    latest = tmp_path / "checkpoints" / "step-00000003"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (latest / "state.pt").write_bytes(pickle.dumps(Evil(), protocol=2))  # refused by the weights-only loader
    write_manifest(latest, sorted(p.name for p in latest.iterdir() if p.name != "manifest.json"), step=3)
    assert ckpt.check(latest) is None  # the manifest matches
    with pytest.warns(UserWarning, match="step-00000003: its files match the manifest but do not load"):
        resumed = train(small(schedule={"steps": 4}), tmp_path, text, resume=True, progress=False,
                        final_eval=False)
    assert len(resumed.losses) == 2  # continued from step 2
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_the_older_separate_projections_is_not_resumed_but_still_loads(text, tmp_path):
    """A trainer checkpoint written when q, k and v were three projections: its optimizer state
    cannot follow the joined projection, so --resume says so in one line (and writes nothing),
    while the same folder still loads for eval and sampling."""
    from safetensors.torch import load_file, save_file

    from test_model import older_state

    train(small(), tmp_path, text, progress=False, final_eval=False)
    latest = tmp_path / "checkpoints" / "step-00000003"
    model = SparseTransformer(small().model)
    model.load_state_dict(load_file(str(latest / "model.safetensors")))
    save_file({k: v.contiguous() for k, v in older_state(model).items()}, str(latest / "model.safetensors"))
    write_manifest(latest, sorted(p.name for p in latest.iterdir() if p.name != "manifest.json"), step=3)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"step-00000003 was written by an older version whose attention had "
                                         r"separate query/key/value projections.*cannot continue this run"):
        train(small(schedule={"steps": 4}), tmp_path, text, resume=True, progress=False, final_eval=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    tokens = torch.randint(0, 256, (1, 20))
    assert torch.equal(load_model(latest)(tokens), model(tokens))


# 7. Nothing overwritten without --force ----------------------------------------------------------

def test_a_fresh_run_does_not_replace_files_it_did_not_write(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.json").write_text("my notes")
    (run / "metrics.png").write_bytes(b"my picture")
    assert cli_train(data_file, run, "--steps", "1") == 2
    assert "already holds train.json, metrics.png (not written by this run); pass --force" in \
        one_error_line(capsys.readouterr().err)
    assert (run / "train.json").read_text() == "my notes" and sorted(os.listdir(run)) == [
        ".lock", "metrics.png", "train.json"]
    assert cli_train(data_file, run, "--steps", "1", "--force") == 0
    assert json.loads((run / "train.json").read_text())["schedule"]["steps"] == 1


def test_sample_and_patterns_do_not_overwrite_or_create_folders(tmp_path, capsys):
    SparseTransformer(ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8,
                                  summary=2)).save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.txt").write_text("keep me")
    args = ["sample", "--checkpoint", str(tmp_path / "m"), "--n", "1", "--steps", "4", "--no-progress",
            "--out", str(out)]
    assert main(args) == 2
    assert f"{out} already holds samples.txt; pass --force" in one_error_line(capsys.readouterr().err)
    assert (out / "samples.txt").read_text() == "keep me"
    assert main(args + ["--force"]) == 0 and (out / "samples.txt").read_bytes().startswith(b"==== sample 0")
    capsys.readouterr()
    picture = tmp_path / "p.png"
    picture.write_bytes(b"my picture")
    assert main(["patterns", "--n", "16", "--out", str(picture)]) == 2
    assert f"--out {picture} exists; pass --force" in one_error_line(capsys.readouterr().err)
    assert picture.read_bytes() == b"my picture"
    nowhere = tmp_path / "no" / "such" / "x.png"
    assert main(["patterns", "--n", "16", "--out", str(nowhere)]) == 2
    assert "the folder" in one_error_line(capsys.readouterr().err) and not (tmp_path / "no").exists()


# 8. Silently wrong numbers -----------------------------------------------------------------------

@pytest.mark.parametrize("max_bytes", [1, 5, 63, 64, 100])
def test_eval_bytes_is_at_most_that_many(text, max_bytes):
    model = SparseTransformer(small().model)
    bits, count = evaluate(model, text.test, 64, max_bytes=max_bytes)
    assert count == max_bytes and np.isfinite(bits)


# 9. Loading checks the manifest and the shapes before allocating ---------------------------------

def test_a_flipped_byte_in_saved_weights_is_refused(tmp_path):
    SparseTransformer(small().model).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: model.safetensors does not match its manifest"):
        SparseTransformer.from_pretrained(tmp_path / "m")


def test_eval_of_a_folder_without_a_manifest_needs_a_flag(text, tmp_path, capsys):
    result = train(small(), tmp_path / "run", text, progress=False, final_eval=False)
    (result.checkpoint / "manifest.json").unlink()
    args = ["eval", "--checkpoint", str(result.checkpoint), "--eval-bytes", "128", "--no-progress"]
    assert main(args) == 2
    assert "has no manifest.json, so its files cannot be verified" in one_error_line(capsys.readouterr().err)
    assert main(args + ["--allow-unverified"]) == 0


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(tmp_path):
    folder = SparseTransformer(small().model).save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, n_layer=8, d_model=512)))
    write_manifest(folder, ["model.safetensors", "config.json"])
    built = []

    class Recording(SparseTransformer):
        def __init__(self, config, pattern=None):
            built.append(torch.empty(0).device.type)  # the device the model is built on
            super().__init__(config, pattern)

    with pytest.raises(ValueError, match=r"does not fit the model in .*config.json: missing blocks.1.norm_attn.weight.*"
                                         r"token.weight is \[256, 32\] in the file, \[256, 512\] in the config"):
        load_model(folder, cls=Recording)
    assert built == ["meta"]  # checked without allocating the config's model (25M parameters here)


# 10. The CLI without Triton ----------------------------------------------------------------------

def test_the_cli_works_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # as if not installed: `import triton` raises ModuleNotFoundError
        from sparse_transformer.cli import main
        for argv in (["--help"], ["train", "--help"], ["bench", "attention", "--help"], ["sample", "--help"]):
            try:
                main(argv)
            except SystemExit as done:
                assert done.code == 0, argv
        assert main(["patterns", "--n", "16"]) == 0
        assert main(["bench", "attention"]) == 2
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "strided_l4" in result.stdout
    assert "error: the attention benchmark needs" in result.stderr


# 14. Long phases say what they do; Ctrl-C is one line --------------------------------------------

def test_the_header_names_the_data_and_evaluation_shows_progress(text, tmp_path, capsys):
    train(small(), tmp_path, text, progress=True)
    captured = capsys.readouterr()
    assert "data stdlib-500k (450,000 training bytes); starting fresh" in captured.out + captured.err
    assert "final evaluation on stdlib-500k: test split" in captured.out + captured.err
    assert "test:" in captured.err  # the evaluation's bar


def test_ctrl_c_during_eval_is_one_line(text, tmp_path, capsys, monkeypatch):
    result = train(small(), tmp_path / "run", text, progress=False, final_eval=False)
    import sparse_transformer.train as train_package

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_package, "evaluate", interrupted)
    assert main(["eval", "--checkpoint", str(result.checkpoint), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# 15. Sampled bytes on a terminal -----------------------------------------------------------------

def test_sample_escapes_control_bytes_on_the_terminal_but_keeps_them_in_the_file(tmp_path, capsys):
    from sparse_transformer.sample_io import printable
    assert printable(b"ok\n\tend\x1b[2J\x07\xff\r\xe2\x80\xae") == "ok\n\tend\\x1b[2J\\x07\\xff\\r\\u202e"
    SparseTransformer(ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8,
                                  summary=2)).save_pretrained(tmp_path / "m")
    assert main(["sample", "--checkpoint", str(tmp_path / "m"), "--n", "1", "--steps", "4", "--no-progress",
                 "--prime-text", "\x1b[2J", "--out", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\\x1b[2J" in shown
    assert b"\x1b[2J" in (tmp_path / "out" / "samples.txt").read_bytes()


# 16. Messages speak of the user's paths ----------------------------------------------------------

def test_messages_and_help_name_no_paths_of_our_machines(tmp_path):
    from sparse_transformer.cli import build_parser
    from sparse_transformer.data import load
    with pytest.raises(ValueError) as refused:
        load("gcide", cache=tmp_path)
    texts = [str(refused.value), build_parser().format_help()]
    texts += [a.format_help() for action in build_parser()._subparsers._group_actions
              for a in action.choices.values()]
    texts.append((Path(__file__).parents[1] / "README.md").read_text())
    for text in texts:
        assert "../shared" not in text and "device machine" not in text


def test_a_backend_that_cannot_run_here_is_refused_before_the_run_folder_is_written(text, tmp_path):
    """model.backend is checked against the device and precision first (fa4 needs a Hopper GPU and
    flash-attn-4): the refusal says what the backend needs, and a retry with another backend is
    not blocked by files of the refused run."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"model.backend: backend 'fa4' cannot run fixed_l8_c2 on torch.float32 cpu "
                                         r"inputs \(fa4: .*pip install sparse-transformer\[fa4\]"):
        train(small(model={"backend": "fa4"}), run, text, progress=False, final_eval=False)
    assert not run.exists() or not any(run.iterdir())
    train(small(), run, text, progress=False, final_eval=False)
