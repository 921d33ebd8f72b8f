"""Which bytes a run trains on: --dataset NAME and --data PATH through data.load, and the
experiment scripts that turn runs into figures."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_transformer.cli.train import build_config
from sparse_transformer.cli import build_parser
from sparse_transformer.config import DataConfig
from sparse_transformer.train import load_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path / "cache"))


def test_a_gz_path_alone_is_decompressed_bytes(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog\n" * 100).encode()
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(text))
    data = load_dataset(DataConfig(path=str(tmp_path / "corpus.txt.gz")), progress=False)
    joined = np.concatenate([data.train, data.validation, data.test]).tobytes()
    assert joined == text  # the decompressed bytes, not the gzip stream


def test_a_plain_file_path_is_split_90_5_5(tmp_path):
    raw = bytes(range(256)) * 40
    (tmp_path / "raw.bin").write_bytes(raw)
    data = load_dataset(DataConfig(path=str(tmp_path / "raw.bin")), progress=False)
    assert (len(data.train), len(data.validation), len(data.test)) == (9216, 512, 512)
    assert data.train[:256].tobytes() == bytes(range(256))


def test_a_named_dataset_takes_the_path_as_its_copy(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((64, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    data = load_dataset(DataConfig(dataset="images", path=str(folder), tile=(32, 32)), progress=False)
    assert data.kind == "image" and len(data.train) == 2 * 3072 and data.test[0] == 80


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'enwik9'.*enwik8"):
        load_dataset(DataConfig(dataset="enwik9"))


def test_cli_dataset_and_data_flags():
    args = build_parser().parse_args(["train", "--preset", "tiny", "--dataset", "gcide", "--data", "x.gz",
                                      "--set", "data.tile=16x16"])
    config = build_config(args)
    # --data is saved absolute: a resumed run or `eval` started from another folder finds the same file
    assert (config.data.dataset, config.data.path, config.data.tile) == ("gcide", str(Path("x.gz").resolve()), (16, 16))


def test_plot_runs_draws_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    paths = []
    for name, slope in (("a", 1.0), ("b", 2.0)):
        rows = [{"split": "train", "step": s, "time": s / 10, "bits_per_byte": 8 - slope * s / 100} for s in range(1, 50)]
        rows += [{"split": "validation", "step": 50, "time": 5.0, "bits_per_byte": 7.0},
                 {"split": "summary", "step": 50, "time": 5.0, "stopped": "time"}]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        paths.append(f"{name}={path}")
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_runs.py"), "--out", str(out), *paths],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_runs.py"), "--out", str(out), "nolabel"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "LABEL=METRICS" in bad.stderr
    tokens = subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_runs.py"), "--out", str(out),
                             "--panels", "validation-tokens", "validation-time", "--tokens-per-step", "1024", *paths],
                            capture_output=True, text=True)
    assert tokens.returncode == 0, tokens.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_runs.py"), "--out", str(out),
                              "--panels", "validation-tokens", *paths], capture_output=True, text=True)
    assert missing.returncode != 0 and "--tokens-per-step" in missing.stderr
