"""``sparse-transformer data prepare|info``."""

import gzip

import pytest

from sparse_transformer.cli import main


def test_data_prepare_and_info(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt.gz"
    corpus.write_bytes(gzip.compress(bytes(range(256)) * 40))  # 10,240 bytes
    assert main(["data", "prepare", "bytes", "--from", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert f"ready, memory-mapped from {tmp_path / 'cache'}" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert rows == {"train": "9,216", "validation": "512", "test": "512"}  # 90 / 5 / 5 of 10,240
    assert main(["data", "info", "bytes", "--from", str(corpus)]) == 0
    info = capsys.readouterr().out
    assert info.splitlines()[0] == "corpus (text)" and info.splitlines()[1:] == out.splitlines()[2:]


def test_data_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path / "cache"))
    assert main(["data", "prepare", "audio"]) == 2
    assert "needs a path (--data; --from for data prepare)" in capsys.readouterr().err
    assert main(["data", "info", "gcide"]) == 2
    assert "gcide is not prepared" in capsys.readouterr().err
    assert main(["data", "prepare", "bytes", "--from", str(tmp_path / "nope")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "audio", "--from", str(tmp_path), "--sample-rate", "0"])
    assert "argument --sample-rate: expected an int >= 1, got 0" in capsys.readouterr().err
    assert main(["data", "prepare", "cifar10", "--from", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder, expected a file" in capsys.readouterr().err
