"""The command line: patterns subcommand and error handling."""

import subprocess
import sys

import matplotlib.image
import pytest

from sparse_transformer.cli import main


def test_patterns_draws_png_and_prints_cost(tmp_path, capsys):
    out = tmp_path / "strided.png"
    assert main(["patterns", "--pattern", "strided", "--stride", "4", "--n", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # n = 32, stride 4: sum over i of min(i+1, 4) + i // 4 = 122 + 112 = 234 pairs.
    assert "keys per query mean 7.3, max 11" in text and f"{234 / 1024:.4%}" in text
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_patterns_per_head_and_long_length(tmp_path, capsys):
    out = tmp_path / "fixed.png"
    assert main(["patterns", "--pattern", "fixed", "--stride", "8", "--summary", "2", "--distinct", "2",
                 "--n", "600", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("head ") == 2 and out.exists()
    assert main(["patterns", "--pattern", "strided", "--stride", "128", "--n", "65536"]) == 0
    assert "max 639" in capsys.readouterr().out


def test_patterns_stride_longer_than_n_and_limits(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["patterns", "--pattern", "strided", "--stride", "128", "--n", "32", "--out", str(out)]) == 0
    assert out.stat().st_size > 0  # used to fail: the default query was n - 1 - stride // 2 < 0
    assert main(["patterns", "--pattern", "strided", "--stride", "128", "--n", "1000000", "--out", str(out),
                 "--force"]) == 2
    assert "n must be <= 32,768 to draw" in capsys.readouterr().err
    assert main(["patterns", "--pattern", "dense", "--part", "row"]) == 2
    assert "part must be None for the dense pattern" in capsys.readouterr().err


def test_bad_argument_is_one_clear_line(capsys):
    assert main(["patterns", "--pattern", "fixed", "--stride", "4", "--summary", "5"]) == 2
    assert "summary must be in [1, 4], got 5" in capsys.readouterr().err
    assert main(["patterns", "--pattern", "fixed", "--stride", "8", "--summary", "2", "--heads", "0"]) == 2
    assert "--heads must be in [1, 64], got 0" in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "sparse_transformer", "patterns", "--n", "16"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "strided_l4" in result.stdout


def test_patterns_takes_a_union_spec_and_any_length(tmp_path, capsys):
    """--pattern takes any spec; the cost of n = 10^11 is closed-form (it used to allocate 800 GB)."""
    out = tmp_path / "union.png"
    assert main(["patterns", "--pattern", "local:6+column:8+global_tokens:3", "--n", "48", "--out", str(out)]) == 0
    assert "global_tokens:3+local:6+column:8" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["patterns", "--pattern", "fixed", "--stride", "128", "--summary", "32", "--n", "100000000000"]) == 0
    assert "max 25,000,000,096" in capsys.readouterr().out
    assert main(["patterns", "--pattern", "local:0"]) == 2
    assert "window must be >= 1" in capsys.readouterr().err
    assert main(["patterns", "--pattern", "strided", "--stride", str(2 ** 63)]) == 2
    assert "stride must be >= 1 and <= 2,147,483,647" in capsys.readouterr().err
    assert main(["patterns", "--n", str(2 ** 63)]) == 2
    assert "n must be in [0, 4,611,686,018,427,387,904]" in capsys.readouterr().err


def test_patterns_out_is_checked_as_the_file_it_writes(tmp_path, capsys):
    """--out without a suffix writes name.png: that file is what --force protects; a folder or
    another format is refused; --heads is bounded (a figure row per head)."""
    (tmp_path / "mine.png").write_text("precious")
    assert main(["patterns", "--n", "32", "--out", str(tmp_path / "mine")]) == 2
    assert "mine.png exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "mine.png").read_text() == "precious"
    assert main(["patterns", "--n", "32", "--out", str(tmp_path), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["patterns", "--n", "32", "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must name a PNG file" in capsys.readouterr().err
    assert main(["patterns", "--n", "32", "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new.png").is_file() and f"wrote {tmp_path / 'new.png'}" in capsys.readouterr().out
    assert main(["patterns", "--pattern", "fixed", "--distinct", "4", "--heads", "500", "--n", "32"]) == 2
    assert "--heads must be in [1, 64], got 500" in capsys.readouterr().err


def test_an_allocation_the_machine_refuses_is_one_line(monkeypatch, capsys):
    """An out-of-memory RuntimeError (the CPU allocator's or CUDA's) ends the command with one line
    and exit code 2; any other RuntimeError is still a bug and keeps its traceback."""
    from sparse_transformer.cli import patterns as patterns_cmd

    def refuse(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 262144000000 bytes.\nmore detail")

    monkeypatch.setattr(patterns_cmd, "run", refuse)
    assert main(["patterns"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory (") and "262144000000 bytes" in err

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(patterns_cmd, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["patterns"])
