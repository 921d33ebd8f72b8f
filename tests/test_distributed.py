"""Several processes on CPU (gloo, started by torchrun): the same losses as one process with the
same global batch, for DDP and FSDP2, and an FSDP checkpoint that resumes exactly."""

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import launch
from sparse_transformer.cli import main
from sparse_transformer.data import load_stdlib

SRC = str(Path(__file__).resolve().parents[1] / "src")
SETS = ["model.n_layer=2", "model.d_model=32", "model.context=64", "model.stride=8", "model.summary=2",
        "data.batch_size=8", "data.eval_bytes=1024", "log_every=1", "sample_bytes=0", "grad_accum=2",
        "checkpoint_every=2"]


def args(data, out, *extra):
    sets = [x for s in SETS for x in ("--set", s)]
    return ["train", "--preset", "tiny", "--data", str(data), "--steps", "4", "--out", str(out), "--no-progress",
            *sets, *extra]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


def torchrun(cli_args, timeout=240):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sparse_transformer", *cli_args]
    done = launch.run(cmd, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "text.bin"
    data.write_bytes(bytes(load_stdlib().train[:300_000]))
    assert main(args(data, root / "one")) == 0
    return data, losses(root / "one")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, parallel, monkeypatch):
    data, expected = single
    # The same bytes gzipped, with an empty cache: rank 0 converts them once, then rank 1 reads them.
    gz = tmp_path / "text.bin.gz"
    gz.write_bytes(gzip.compress(data.read_bytes(), compresslevel=1))
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path / "cache"))
    out = torchrun(args(gz, tmp_path / "run", "--parallel", parallel, "--set", "sample_bytes=16"))
    assert "2 process(es)" in out and "stopped after 4 steps" in out
    assert out.count("sample:\n") == 1  # rank 0 samples (under FSDP from an unsharded copy)
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    if parallel == "fsdp":  # resume from the step-2 checkpoint: steps 3 and 4 again, same losses
        shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
        (tmp_path / "run" / "metrics.jsonl").unlink()
        torchrun(args(gz, tmp_path / "run", "--parallel", parallel, "--resume"))  # the run's own data
        resumed = losses(tmp_path / "run")
        assert sorted(resumed) == [3, 4]
        assert all(resumed[s] == got[s] for s in (3, 4))
