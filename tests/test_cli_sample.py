"""``sparse-transformer sample`` on tiny saved models: text, image grids, completions, audio."""

import argparse
import json
import os
import socket
import threading
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from sparse_transformer.cli import main
from sparse_transformer.config import DataConfig, ModelConfig, TrainConfig, to_dict
from sparse_transformer.model import SparseTransformer
from sparse_transformer.sample_io import image_grid, image_scale, mu_law_decode
from sparse_transformer.sampling import generate

soundfile = pytest.importorskip("soundfile", reason="audio tests need soundfile (pip install -e \".[data]\")")


def save(tmp_path, model_config, dataset=None):
    torch.manual_seed(0)
    model = SparseTransformer(model_config)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    folder = model.save_pretrained(tmp_path / "model")
    if dataset is not None:  # as a trainer checkpoint folder holds it
        (folder / "train.json").write_text(json.dumps(to_dict(TrainConfig(model=model_config,
                                                                          data=DataConfig(dataset=dataset)))))
    return folder, model


def test_text_to_stdout_and_file(tmp_path, capsys):
    folder, model = save(tmp_path, ModelConfig(n_layer=2, n_head=2, d_model=32, context=40, stride=8, summary=2))
    out = tmp_path / "out"
    args = ["sample", "--checkpoint", str(folder), "--n", "3", "--prime-text", "def ", "--steps", "20",
            "--temperature", "0", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    written = (out / "samples.txt").read_bytes()
    assert written.count(b"==== sample ") == 3 and stdout.count("==== sample ") == 3
    # Greedy: the same bytes as the library call.
    expected = generate(model, torch.tensor([list(b"def ")] * 3), 20, temperature=0)[0].numpy().astype(np.uint8)
    first = written.split(b"==== sample 0 ====\n")[1][:24]
    assert first == expected.tobytes()
    # Sampling at temperature 1 is reproducible from --seed.
    runs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(args[:-5] + ["--temperature", "1", "--seed", seed, "--out", str(tmp_path / name),
                                 "--no-progress"]) == 0
        runs.append((tmp_path / name / "samples.txt").read_bytes())
    assert runs[0] == runs[1] != runs[2]


def test_image_samples_and_completions(tmp_path):
    config = ModelConfig(n_layer=2, n_head=2, d_model=32, context=48, pattern="strided", stride=12,
                         position_axes=(4, 4, 3))
    folder, _ = save(tmp_path, config, dataset="cifar10")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=5 * 48, dtype=np.uint8)
    raw = tmp_path / "test-images.bin"
    images.tofile(raw)
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(folder), "--n", "5", "--complete-images", "3", "--data", str(raw),
                 "--out", str(out), "--no-progress", "--top-k", "20"]) == 0
    s = image_scale(4)  # 16: 4-pixel images drawn 64 pixels high
    samples = matplotlib.image.imread(out / "samples.png")
    assert samples.shape[:2] == (2 * (4 * s + 2) + 2, 3 * (4 * s + 2) + 2)  # 5 images: 3 columns, 2 rows
    completions = matplotlib.image.imread(out / "completions.png")
    assert completions.shape[:2] == (3 * (4 * s + 2) + 2, 2 * (4 * s + 2) + 2)  # original | completion rows
    # The completion keeps the original's top half (2 of 4 rows) and the original sits on the left.
    pixels = np.round(completions[..., :3] * 255).astype(np.uint8)
    cell = lambda r, c: pixels[2 + r * (4 * s + 2):2 + r * (4 * s + 2) + 4 * s:s,  # noqa: E731
                               2 + c * (4 * s + 2):2 + c * (4 * s + 2) + 4 * s:s]
    original = images[:48].reshape(4, 4, 3)
    assert np.array_equal(cell(0, 0), original)
    assert np.array_equal(cell(0, 1)[:2], original[:2])


def test_audio_to_wav(tmp_path):
    config = ModelConfig(n_layer=1, n_head=2, d_model=16, context=64, pattern="strided", stride=8)
    folder, _ = save(tmp_path, config, dataset="audio")
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(folder), "--n", "2", "--steps", "50", "--out", str(out),
                 "--no-progress"]) == 0
    for i in range(2):
        data, rate = soundfile.read(out / f"sample-{i}.wav")
        assert rate == 12000 and data.shape == (50,) and np.abs(data).max() <= 1.0


def test_mu_law_decode_endpoints():
    assert mu_law_decode(np.array([0, 255])).tolist() == pytest.approx([-1.0, 1.0])
    assert abs(mu_law_decode(np.array([128]))[0]) < 0.01


def test_image_grid_places_images():
    images = np.arange(2 * 2 * 3 * 1, dtype=np.uint8).reshape(2, 2, 3, 1)
    grid = image_grid(images, columns=2, pad=1)
    assert grid.shape == (4, 9, 1)
    assert np.array_equal(grid[1:3, 1:4], images[0]) and np.array_equal(grid[1:3, 5:8], images[1])


def test_bad_arguments(tmp_path, capsys):
    folder, _ = save(tmp_path, ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8, summary=2))
    assert main(["sample", "--checkpoint", str(folder), "--steps", "40", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    assert "context 32" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(folder), "--complete-images", "2", "--n", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "needs an image model" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_bad_input_is_caught_before_any_sampling(tmp_path, capsys):
    text_model, _ = save(tmp_path / "text", ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8,
                                                        summary=2))
    image_model, _ = save(tmp_path / "image", ModelConfig(n_layer=1, n_head=2, d_model=16, context=48,
                                                          pattern="strided", stride=12, position_axes=(4, 4, 3)),
                          dataset="cifar10")
    out = tmp_path / "o"
    long_prime = tmp_path / "long.txt"
    long_prime.write_bytes(b"x" * 40)
    (tmp_path / "a-file").write_bytes(b"")
    cases = [
        # A prime as long as the context used to surface as "steps must be an int >= 0, got -8".
        ([text_model, "--prime-file", long_prime], "--prime-file " + str(long_prime) + " is 40 bytes, leaving no "
                                                   "room in the model's context 32"),
        ([text_model, "--prime-text", "y" * 32], "--prime-text is 32 bytes"),
        ([text_model, "--prime-text", "abc", "--steps", "30"], "prime (3 bytes) + --steps 30 = 33 exceeds"),
        ([text_model, "--prime-file", tmp_path / "missing.txt"], "missing.txt: no such file"),  # was a traceback
        ([text_model, "--prime-file", tmp_path], "is a folder; expected a file of bytes"),
        # Checked after 16 unconditional samples had been drawn; now before.
        ([text_model, "--complete-images", "2"], "--complete-images needs an image model; this one generates text"),
        ([image_model, "--complete-images", "2", "--data", tmp_path / "none.raw"], "none.raw: no such file"),
        ([image_model, "--steps", "10"], "prime + --steps must fill the context, got 0 + 10"),
        ([text_model, "--n", "0"], "nothing to sample"),
        ([text_model, "--out", tmp_path / "a-file"], "a-file is a file; expected a folder"),
        ([text_model, "--device", "gpu0"], "device must be cpu, cuda or cuda:N, got 'gpu0'"),
    ]
    for args, message in cases:
        argv = ["sample", "--no-progress", "--out", str(out), "--checkpoint"] + [str(a) for a in args]
        assert main(argv) == 2, args
        assert message in capsys.readouterr().err, args
        assert not out.exists()  # nothing sampled, nothing written
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(text_model), "--top-k", "0"])
    assert "argument --top-k: expected an int >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs pipes and /dev/zero")
def test_prime_file_may_be_a_pipe_or_a_device(tmp_path, capsys):
    """/dev/null said "no such file": it is an empty prime, as an empty file is; a pipe is read as a file is."""
    folder, _ = save(tmp_path, ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8, summary=2))

    def sample(name, *prime):
        out = tmp_path / name
        assert main(["sample", "--checkpoint", str(folder), "--n", "2", "--steps", "12", "--temperature", "0",
                     "--out", str(out), "--no-progress", *map(str, prime)]) == 0, capsys.readouterr().err
        return (out / "samples.txt").read_bytes()

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert sample("null", "--prime-file", "/dev/null") == sample("empty", "--prime-file", empty)
    pipe = tmp_path / "prime.fifo"  # as `--prime-file <(printf 'def ')` passes it
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_bytes, args=(b"def ",), daemon=True)
    writer.start()
    from_pipe = sample("pipe", "--prime-file", pipe)
    writer.join(timeout=30)
    assert not writer.is_alive() and from_pipe == sample("text", "--prime-text", "def ")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.sock"))
        out = tmp_path / "o"
        for prime, message in (
                # A device that never ends is read only as far as the context: one line, no hang.
                ("/dev/zero", "--prime-file /dev/zero is 32 bytes or more, leaving no room in the model's context 32"),
                (tmp_path / "s.sock", f"--prime-file {tmp_path / 's.sock'} is a socket; expected a file of bytes")):
            assert main(["sample", "--checkpoint", str(folder), "--prime-file", str(prime), "--out", str(out),
                         "--no-progress"]) == 2
            assert message in capsys.readouterr().err
            assert not out.exists()


def test_a_checkpoint_that_is_not_a_folder_is_named_with_what_is_expected(tmp_path, capsys):
    """A file given as --checkpoint read "<file> holds no model.safetensors ... under <file>/checkpoints"."""
    folder, _ = save(tmp_path, ModelConfig(n_layer=1, n_head=2, d_model=16, context=32, stride=8, summary=2))
    expected = "expected a checkpoint or save_pretrained folder (with model.safetensors) or a run folder"
    (tmp_path / "empty").mkdir()
    cases = [(folder / "config.json", f"--checkpoint {folder / 'config.json'} is a file; {expected}"),
             (folder / "model.safetensors", f"is a file; {expected} (pass its folder, {folder})"),
             (os.devnull, f"--checkpoint {os.devnull} is not a folder; {expected}"),
             (tmp_path / "empty", f"--checkpoint {tmp_path / 'empty'} holds no model.safetensors and no intact "
                                  f"checkpoint under {tmp_path / 'empty' / 'checkpoints'}; {expected}"),
             (tmp_path / "missing", f"--checkpoint {tmp_path / 'missing'}: no such file or folder; {expected}")]
    for command in (["eval"], ["sample", "--out", str(tmp_path / "o")]):
        for checkpoint, message in cases:
            assert main(command + ["--checkpoint", str(checkpoint), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_eval_on_other_pictures_keeps_the_runs_tile(tmp_path, capsys, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path / "cache"))
    config = ModelConfig(n_layer=1, n_head=2, d_model=16, context=48, pattern="strided", stride=12,
                         position_axes=(4, 4, 3))
    folder, _ = save(tmp_path, config)
    (folder / "train.json").write_text(json.dumps(to_dict(TrainConfig(model=config, data=DataConfig(
        dataset="images", tile=(4, 4))))))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(pictures / f"{name}.png")
    assert main(["eval", "--checkpoint", str(folder), "--dataset", "images", "--data", str(pictures),
                 "--split", "test"]) == 0
    # 4x4 tiles of the run, not the default 32x32: the 256 tiles of c.png, every byte scored
    assert "bits per dim on tiles4x4 (all 12,288 bytes scored)" in capsys.readouterr().out


def test_help_states_each_default_once():
    """A flag whose help already says its default, or whose default is None, gets no second
    '(default: ...)' from the formatter; other flags still show theirs."""
    from sparse_transformer.cli import build_parser

    def commands(parser, name="sparse-transformer"):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from commands(sub, f"{name} {sub_name}")

    helps = {name: parser.format_help() for name, parser in commands(build_parser())}
    assert "sparse-transformer data prepare" in helps and "sparse-transformer bench attention" in helps
    text = helps["sparse-transformer sample"]
    assert "(default: fill the context)" in text and "(default: 16)" in text  # --steps, --n
    for name, text in helps.items():
        assert "(default: None)" not in text, name


def test_sample_and_eval_choose_the_backend_not_the_checkpoint(tmp_path, capsys):
    """A model saved with a GPU-only backend samples on the CPU: --backend (default auto) replaces
    the saved one; a backend that cannot run here is refused in one line."""
    from sparse_transformer.weights import load_model

    config = ModelConfig(n_layer=1, n_head=2, d_model=32, context=32, pattern="fixed", stride=8, summary=2,
                         backend="fa4")
    SparseTransformer(config).save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").config.backend == "fa4"
    assert load_model(tmp_path / "m", backend="auto").config.backend == "auto"
    sample = ["sample", "--checkpoint", str(tmp_path / "m"), "--n", "1", "--steps", "4", "--device", "cpu"]
    assert main([*sample, "--out", str(tmp_path / "s")]) == 0
    assert main([*sample, "--out", str(tmp_path / "s2"), "--backend", "fa4"]) == 2
    assert "backend 'fa4' cannot run" in capsys.readouterr().err
