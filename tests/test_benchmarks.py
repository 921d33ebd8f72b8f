"""The multi-process benchmark scripts, on CPU with gloo: what they run on 2 GPUs for issue 9."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import launch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layer=2", "model.d_model=32", "model.context=64", "model.stride=8", "model.summary=2",
         "data.batch_size=8"]


def script(name, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    done = launch.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_scaling_runs_one_and_two_processes(tmp_path):
    sets = [x for s in SMALL for x in ("--set", s)]
    script("scaling.py", "--preset", "tiny", "--steps", 8, "--eval-bytes", 1024, "--runs", tmp_path / "runs",
           "--out", tmp_path / "out", *sets)
    report = json.loads((tmp_path / "out" / "scaling-cpu.json").read_text())
    assert list(report["runs"]) == ["1 process", "2 processes, ddp", "2 processes, fsdp"]
    assert report["tokens_per_step"] == 8 * 64
    one = report["runs"]["1 process"]
    for label, run in report["runs"].items():
        assert run["steps"] == 8
        assert run["tokens_per_s"] == pytest.approx(512 / run["steady_s_per_step"])
        assert sorted(map(int, run["loss_bits"])) == list(range(1, 9))
        if label != "1 process":
            # fp32 on CPU with no gradient compression: the same global batch gives the same losses
            assert run["vs_one"]["loss_max_abs_diff_bits"] < 1e-4
            assert run["vs_one"]["scaling_efficiency"] == pytest.approx(run["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert (tmp_path / "out" / "scaling-cpu.png").stat().st_size > 0
    assert "| 2 processes, fsdp |" in (tmp_path / "out" / "scaling-cpu.md").read_text()


def test_scaling_rejects_too_few_steps(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--steps", "3"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "--steps must be >= 8" in done.stderr


@pytest.mark.slow
def test_presets_step_sharded_over_two_processes(tmp_path):
    out = tmp_path / "presets.json"
    script("presets.py", "--presets", "tiny", "--device", "cpu", "--nproc", 2, "--parallel", "fsdp",
           "--steps", 1, "--out", out)
    (record,) = json.loads(out.read_text())
    assert record["processes"] == 2 and record["parallel"] == "fsdp"
    assert record["first_loss_bits"] == pytest.approx(8.0, abs=1e-3)  # zero output projection at step 0
    assert record["s_per_iter"] > 0 and record["tokens_per_s"] > 0


@pytest.mark.slow
def test_largest_model_climbs_the_ladder_and_stops_at_the_first_failure(tmp_path):
    out = tmp_path / "largest.json"
    printed = script("largest_model.py", "--presets", "tiny", "--device", "cpu", "--shapes", "2x64", "4x128",
                     "--set", "model.context=64", "--out", out)
    records = json.loads(out.read_text())
    assert [(r["shape"], r["n_layer"], r["d_model"]) for r in records] == [("2x64", 2, 64), ("4x128", 4, 128)]
    assert records[1]["parameters"] > records[0]["parameters"]
    assert "largest that trained: 4x128" in printed
    script("largest_model.py", "--presets", "tiny", "--device", "cpu", "--shapes", "2x64", "4x128",
           "--timeout", 0.01, "--out", out)
    (failed,) = json.loads(out.read_text())  # the first failure ends the search
    assert failed["shape"] == "2x64" and "timed out" in failed["error"]


@pytest.mark.slow
def test_sampling_benchmark_saves_after_every_mode_and_keeps_other_presets(tmp_path):
    out = tmp_path / "results"
    script("sampling.py", "--quick", "--preset", "cifar10", "--modes", "eager", "--out", out)
    script("sampling.py", "--quick", "--preset", "enwik8", "--modes", "eager", "cudagraph", "--out", out)
    (path,) = out.glob("sampling-*-quick.json")
    report = json.loads(path.read_text())
    modes = {w["preset"]: [m["mode"] for m in w["modes"]] for w in report["workloads"]}
    assert modes == {"cifar10": ["eager"], "enwik8": ["eager", "cudagraph"]}
    for work in report["workloads"]:
        for row in work["modes"]:  # the cache decodes faster than re-running the forward pass per byte
            assert row["cache_bytes"] > 0 and row["speedup_vs_rerun_full"] > 1
    assert "| enwik8: 2 x 256 | cudagraph (auto) |" in path.with_suffix(".md").read_text()
    # Running both presets again replaces their rows (each preset once, in this run's order).
    script("sampling.py", "--quick", "--modes", "eager", "--backends", "torch", "--out", out)
    report = json.loads(path.read_text())
    assert [(w["preset"], [(m["mode"], m["backend"]) for m in w["modes"]]) for w in report["workloads"]] == [
        ("cifar10", [("eager", "torch")]), ("enwik8", [("eager", "torch")])]


def test_a_failed_preset_records_the_exception_not_torchruns_banner(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from presets import failure
    log = ("[rank0]: Traceback (most recent call last):\n[rank0]: FileNotFoundError: manifest.json\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + "=" * 60 + "\nFailures:\n")
    assert failure(log) == "[rank0]: FileNotFoundError: manifest.json"
    assert failure("ValueError: bad --set\n") == "ValueError: bad --set"
    assert failure("RuntimeError: CUDA out of memory. Tried to allocate") == "out of memory"
    assert failure("") == "no output"


def test_kernel_scripts_need_a_gpu():
    """Without CUDA the kernel sweep and the profile stop with a clear error, not a traceback deep in Triton."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present (test_kernel_scripts_on_the_gpu runs them)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    kernels = str(ROOT / "src" / "sparse_transformer" / "attention" / "triton_kernels.py")
    for name, args in (("kernel_sweep.py", ["strided", "1024"]), ("profile_attention.py", ["--n", "1024"]),
                       ("kernel_ab.py", [f"A={kernels}"]), ("fa4.py", ["--n", "1024"])):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]


@pytest.mark.gpu
def test_kernel_scripts_on_the_gpu(tmp_path):
    out = script("kernel_sweep.py", "strided", 4096, "local:64,64,4,3")
    rows = [line.split() for line in out.splitlines() if "fwd+bwd" in line]
    assert [r[2] for r in rows] == ["default", "local:64,64,4,3"]
    assert all(float(r[-1]) > 0 for r in rows)
    out = script("profile_attention.py", "--pattern", "strided", "--n", 4096, "--repeats", 2)
    per_launch = out.split("per launch")[1]
    assert per_launch.count("_dkdv_kernel") == 2 and per_launch.count("_fwd_kernel") == 2  # row and column parts
    out = script("fa4.py", "--n", 4096, "--out", tmp_path)
    rows = [line.split("|") for line in out.splitlines() if "| fixed_l128_c32 |" in line]
    methods = [r[3].strip() for r in rows]
    assert methods[:2] == ["triton", "flex_as_is"] and "flex_concatenated" in methods and float(rows[0][6]) > 0
    assert not any("concatenated" in line or "direct" in line for line in out.splitlines() if "| strided_l128 |" in line)
    kernels = ROOT / "src" / "sparse_transformer" / "attention" / "triton_kernels.py"
    out = script("kernel_ab.py", "--rounds", 1, "--cases", "strided:4096", f"A={kernels}", f"T={kernels}@tma:1")
    assert "T differs from A by" in out
    rows = [line.split() for line in out.splitlines() if "fwd+bwd" in line]
    assert [r[2] for r in rows] == ["A", "T"] and all(float(r[r.index("fwd+bwd") + 1]) > 0 for r in rows)


def test_kernel_resources_compiles_every_launch_for_hopper_without_a_gpu():
    """benchmarks/kernel_resources.py records the launches of one fwd+bwd and compiles each for sm_90."""
    import importlib.util
    spec = importlib.util.find_spec("triton")
    if spec is None or not (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("needs Triton's CUDA backend (ptxas and cuobjdump ship in its wheel)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--pattern", "dense",
                           "--n", "256", "--tokens", "512", "--sass", "--host"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if "registers" in line]
    # dense: one forward launch, then dQ (which also writes delta) before dK/dV
    assert [r[1] for r in rows] == ["_fwd_kernel", "_dq_kernel", "_dkdv_kernel"]
    assert all(0 < int(r[r.index("registers") + 1]) <= 255 for r in rows)
    assert rows[0][-1] == "64"  # programs: 4 query tiles of 64 x 2 sequences x 8 heads
    sass = [dict(item.rsplit(" ", 1) for item in line.split("sass: ")[1].split(", "))
            for line in done.stdout.splitlines() if "sass:" in line]
    host = re.search(r"forward ([\d.]+) us, backward ([\d.]+) us", done.stdout)
    assert host and float(host[1]) > 0 and float(host[2]) > 0
    assert len(sass) == 3 and all(int(c["mma"]) > 0 and int(c["mufu"]) > 0 and int(c["total"]) > int(c["int"])
                                  for c in sass)


def test_fa4_script_runs_each_pattern_through_its_forms(monkeypatch):
    """benchmarks/fa4.py's rows without a GPU: its kernels swapped for the portable backend and its
    timer for one call. Strided skips the fixed-only forms; forms needing flash-attn-4 say so when it
    is missing; every other form gets its error against ours."""
    import torch

    import sparse_transformer as st
    from sparse_transformer.benchmark.attention import Row

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fa4

    P = st.patterns

    def portable(q, k, v, pattern, scale):
        return st.sparse_attention(q, k, v, pattern, scale, backend="torch")

    def once(label, method, fn, n, batch, pairs, heads, d, grad, inputs, note=""):
        fn().backward(grad)
        return Row(label, n, batch, method, 1.0, 2.0, 3.0, 1.0, 0.1, note)

    forms = {name: portable for name in fa4.FORMS}
    forms["flex_concatenated"] = lambda q, k, v, p, s: portable(q, k, v, p, s) * 1.01  # a form that differs
    monkeypatch.setattr(fa4, "FORMS", forms)
    monkeypatch.setattr(fa4, "measure", once)
    monkeypatch.setattr(fa4.fa4_backend, "available", lambda: False)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2, 64, 8, generator=g, requires_grad=i < 3) for i in range(4))
    rows = {P.strided(8).name: fa4.pattern_rows(P.strided(8), 64, q, k, v, grad, lambda r: None),
            P.fixed(8, 2).name: fa4.pattern_rows(P.fixed(8, 2), 64, q, k, v, grad, lambda r: None)}
    strided, fixed = rows.values()
    assert [r["method"] for r in strided] == ["triton", "flex_as_is", "flex_flash_as_is"]
    assert [r["method"] for r in fixed] == list(fa4.FORMS)
    by = {r["method"]: r for r in fixed}
    assert by["triton"]["error"] is None and by["flex_as_is"]["error"] < 1e-6
    assert 0.005 < by["flex_concatenated"]["error"] < 0.02
    assert all(by[m]["fwdbwd_ms"] is None and by[m]["note"].startswith("not run") for m in fa4.NEEDS_FA4)
    table = fa4.markdown(strided + fixed, "test device")
    assert "| fixed_l128_c32" not in table and "| fixed_l8_c2 | 64 | fa4_direct | — | — | — | — | — | not run" in table


def test_fa4_script_rounds_take_turns_and_keep_the_median(monkeypatch):
    """--rounds: every form is timed once a round, the forms in turn (not one form's rounds in a row),
    and each row is its median round with every round listed."""
    import torch

    import sparse_transformer as st
    from sparse_transformer.benchmark.attention import Row

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fa4

    order, times = [], iter([5.0, 1.0, 9.0, 2.0, 3.0, 7.0, 4.0, 8.0, 6.0])

    def once(label, method, fn, n, batch, pairs, heads, d, grad, inputs, note=""):
        order.append(method)
        t = next(times)
        return Row(label, n, batch, method, t / 2, t / 2, t, 1.0, 0.1, note)

    monkeypatch.setattr(fa4, "FORMS", {name: (lambda q, k, v, p, s: st.sparse_attention(q, k, v, p, s, backend="torch"))
                                       for name in fa4.FORMS})
    monkeypatch.setattr(fa4, "measure", once)
    monkeypatch.setattr(fa4.fa4_backend, "available", lambda: True)
    q, k, v, grad = (torch.randn(1, 2, 64, 8, requires_grad=i < 3) for i in range(4))
    rows = fa4.pattern_rows(st.patterns.strided(8), 64, q, k, v, grad, lambda r: None, rounds=3)
    assert order == ["triton", "flex_as_is", "flex_flash_as_is"] * 3
    assert [r["rounds_ms"] for r in rows] == [[5.0, 2.0, 4.0], [1.0, 3.0, 8.0], [9.0, 7.0, 6.0]]
    assert [r["fwdbwd_ms"] for r in rows] == [4.0, 3.0, 7.0]
    assert "rounds: 5.000, 2.000, 4.000" in fa4.markdown(rows, "test device")
    assert "--rounds must be >= 1" in subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fa4.py"), "--rounds", "0"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), timeout=120).stderr


def test_attention_rows_hold_a_forms_error_against_ours(monkeypatch):
    """measure(reference=ours): the row keeps the form's largest relative error (output and gradients)
    against ours; a reference that fails leaves a note, not a lost row. Timing swapped for constants."""
    import torch

    import sparse_transformer as st
    from sparse_transformer.benchmark import attention as bench

    monkeypatch.setattr(bench, "_time", lambda fn, grad, inputs: (1.0, 2.0, 3.0))
    monkeypatch.setattr(bench, "_peak", lambda fn, grad, inputs: 0.1)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2, 32, 8, generator=g, requires_grad=i < 3) for i in range(4))
    pattern = st.patterns.local(8) | st.patterns.global_tokens(2)
    ours = lambda: st.sparse_attention(q, k, v, pattern, backend="torch")  # noqa: E731
    same = lambda: st.sparse_attention(q, k, v, pattern, backend="reference").float()  # noqa: E731
    args = (32, 1, 100, 2, 8, grad, (q, k, v))  # n, batch, pairs, heads, head width, grad, inputs
    assert bench.measure(pattern.name, "form", same, *args).error is None  # no reference: no error
    assert bench.measure(pattern.name, "form", same, *args, reference=ours).error < 1e-5
    off = bench.measure(pattern.name, "form", lambda: ours() * 1.01, *args, reference=ours)
    assert 0.005 < off.error < 0.02 and off.fwdbwd_ms == 3.0

    def broken():
        raise AssertionError("flash-attn-4 check")
    row = bench.measure(pattern.name, "form", same, *args, reference=broken)
    assert row.error is None and row.fwdbwd_ms == 3.0 and "error check failed: flash-attn-4 check" in row.note


def test_attention_benchmark_warms_each_n_and_pattern_in_its_own_process(capsys, tmp_path):
    """--warm-jobs: one child benchmark per (N, pattern), writing into a scratch folder; each child's
    end is reported (here, without a GPU, each one fails with its one-line reason)."""
    import argparse

    import torch

    from sparse_transformer.benchmark import attention

    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    args = parser.parse_args(["--n", "64", "128", "--patterns", "strided", "local:8+global_tokens:2", "--warm-jobs", "2"])
    commands = attention.warm_commands(args, tmp_path)
    assert [(c[c.index("--n") + 1], c[c.index("--patterns") + 1]) for c in commands] == [
        ("64", "strided"), ("64", "local:8+global_tokens:2"), ("128", "strided"), ("128", "local:8+global_tokens:2")]
    assert len({c[c.index("--out") + 1] for c in commands}) == 4 and all(
        c[c.index("--out") + 1].startswith(str(tmp_path)) for c in commands)
    if torch.cuda.is_available():
        return
    args.n, args.patterns = [64], ["strided"]
    attention.warm_caches(args)
    out = capsys.readouterr().out
    assert "warming the compile caches: 1 runs, 2 at a time, at most 600 s each" in out
    assert "--n 64 --patterns strided: failed with exit code 1 after " in out and "needs a CUDA GPU" in out


def test_warm_runs_report_how_many_forms_compiled(monkeypatch, capsys):
    """A child that ends well is reported with its forms that ran and those that failed (read from the
    results it wrote), not just 'done'."""
    import argparse
    import subprocess

    from sparse_transformer.benchmark import attention

    def child(command, **kwargs):  # stands in for a GPU run: writes the results file a run would
        out = Path(command[-1])
        out.mkdir(parents=True)
        rows = [{"method": "triton", "fwdbwd_ms": 1.0}, {"method": "flex_as_is", "fwdbwd_ms": 2.0},
                {"method": "flex_decomposed_merged_compiled", "fwdbwd_ms": None}]
        (out / "gpu.json").write_text(json.dumps({"rows": rows}))
        assert int(kwargs["env"]["TORCHINDUCTOR_COMPILE_THREADS"]) >= 1
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", child)
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    attention.warm_caches(parser.parse_args(["--n", "4096", "--patterns", "fixed", "--warm-jobs", "1"]))
    out = capsys.readouterr().out
    assert "--n 4096 --patterns fixed: 2 forms compiled and ran in " in out
    assert ", 1 failed (flex_decomposed_merged_compiled)" in out


def test_a_warm_run_past_its_time_is_stopped_and_said(monkeypatch, capsys):
    """--warm-timeout: a child still compiling when its time is up is stopped and reported, and the
    other children are reported as they end, not held back behind it."""
    import argparse
    import subprocess

    from sparse_transformer.benchmark import attention

    def child(command, **kwargs):
        if command[command.index("--n") + 1] == "4096":
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        return subprocess.CompletedProcess(command, 1, "", "ValueError: no GPU")

    monkeypatch.setattr(subprocess, "run", child)
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    attention.warm_caches(parser.parse_args(["--n", "4096", "16384", "--patterns", "fixed", "--warm-jobs", "2",
                                             "--warm-timeout", "30"]))
    out = capsys.readouterr().out
    assert "--n 4096 --patterns fixed: stopped after 30 s" in out
    assert "--n 16384 --patterns fixed: failed with exit code 1 after " in out and "ValueError: no GPU" in out


def test_attention_table_counts_flex_on_fa4_among_the_flex_forms():
    """The attention table's 'Flex on FA4' column is the faster of its two forms, and best Flex takes
    it into account; without flash-attn-4 the column reads — and best Flex is the Triton forms'."""
    from sparse_transformer.benchmark.attention import Row, markdown

    def row(method, ms, pattern="window_global"):
        return Row(pattern, 16384, 4, method, ms / 4, ms * 3 / 4, ms, 1.0, 0.5, "")

    rows = [row("sdpa_default", 8.0, "dense"), row("triton", 1.8), row("flex_as_is", 2.7),
            row("flex_concatenated", 3.0), row("flex_flash_as_is", 1.5), row("flex_flash_concatenated", 1.6)]
    line = next(l for l in markdown(rows, "test").splitlines() if l.startswith("| window_global"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[8:10] == ["1.50", "1.50"] and cells[-2] == "0.8x"
    line = next(l for l in markdown(rows[:4], "test").splitlines() if l.startswith("| window_global"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[8:10] == ["—", "2.70"] and cells[-2] == "1.5x"


def test_decode_step_launches_per_layer_without_a_gpu(monkeypatch):
    """benchmarks/decode_kernels.py counts one decode step's launches per layer on the CPU: four
    matmuls (q/k/v together, the attention output, the feed-forward pair), the decode kernel once,
    the compact summary-slot scatter only where the pattern has summary slots (fixed, not strided)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import decode_kernels

    fixed = decode_kernels.step_launches("enwik8", 2, 256) - decode_kernels.step_launches("enwik8", 1, 256)
    strided = decode_kernels.step_launches("cifar10", 2, 256) - decode_kernels.step_launches("cifar10", 1, 256)
    for per_layer in (fixed, strided):
        assert per_layer["addmm"] == 4 and per_layer["triton decode kernel"] == 1
        assert per_layer["native_layer_norm"] == 2 and per_layer["add"] == 2
        assert "cat" not in per_layer  # keys and values come out of the projection side by side, as cached
    assert fixed["scatter_"] == 1 and "scatter_" not in strided


def test_attention_benchmark_checks_its_arguments_before_anything_runs(tmp_path, capsys):
    """Bad sizes and pattern specs are refused in one line before the GPU check, so a run never
    starts (and replaces a results file) only to fail on a later row."""
    from sparse_transformer.cli import main

    for args, message in ((["--n", "4096", "0"], "--n must be >= 1, got 4096 0"),
                          (["--patterns", "strided", "bogus:3"], "pattern spec 'bogus:3': unknown part 'bogus'"),
                          (["--head-dim", "48"], "--head-dim must be one of 16, 32, 64, 128, got 48"),
                          (["--tokens", "0"], "--tokens must be >= 1, got 0")):
        assert main(["bench", "attention", "--out", str(tmp_path / "out"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
