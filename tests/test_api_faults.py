"""Faults of the public Python API (sparse_attention, ModelConfig, SparseTransformer, generate,
save/from_pretrained) and of the eval, sample and patterns commands: bad input is one ValueError
(one line from the command) naming the argument and what is expected, never a traceback from inside
torch, and no flag is silently ignored."""

import json

import pytest
import torch

import sparse_transformer as st
from sparse_transformer.cli import main
from sparse_transformer.config import DataConfig, ModelConfig, TrainConfig, to_dict
from sparse_transformer.model import SparseTransformer
from sparse_transformer.sampling import generate

P = st.patterns
SMALL = dict(n_layer=1, n_head=2, d_model=16, context=32, stride=8, summary=2)


def small_model(**fields) -> SparseTransformer:
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(**{**SMALL, **fields}))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def saved(tmp_path, dataset=None):
    folder = small_model().save_pretrained(tmp_path / "model")
    if dataset is not None:
        (folder / "train.json").write_text(json.dumps(to_dict(TrainConfig(model=ModelConfig(**SMALL),
                                                                          data=DataConfig(dataset=dataset)))))
    return folder


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- sparse_attention

def test_sparse_attention_refuses_a_float_dtype_it_cannot_compute_in():
    x = torch.zeros(1, 2, 4, 8).to(torch.float8_e4m3fn)  # was a NotImplementedError ("isfinite")
    with pytest.raises(ValueError, match=r"q must be a floating-point tensor \(torch.float16.*got torch.float8"):
        st.sparse_attention(x, x, x, P.strided(2), backend="torch")


# ---------------------------------------------------------------- ModelConfig

@pytest.mark.parametrize("fields,message", [
    (dict(dropout="0.1"), r"model.dropout must be a finite number >= 0 and < 1, got '0.1'"),  # TypeError
    (dict(half_qk="no"), r"model.half_qk must be true or false, got 'no'"),  # was obeyed: half-size
    (dict(half_ff=1), r"model.half_ff must be true or false, got 1"),
    (dict(backend=["torch"]), r"model.backend must be 'auto' or one of"),  # TypeError: unhashable
    (dict(position_axes=32), r"model.position_axes must be a tuple of int sizes"),  # TypeError
    (dict(position_axes="abc"), r"model.position_axes must be a tuple of int sizes"),  # named no field
    (dict(position_axes=(4.5, 8)), r"model.position_axes must be a tuple of int sizes"),  # cut to (4, 8)
    (dict(context=2 ** 31), r"model.context must be <= 16,777,216, got 2,147,483,648"),  # OOM-killed, silently
])
def test_model_config_names_a_field_of_the_wrong_type(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **fields})


def test_model_config_still_takes_axes_as_a_list_and_dropout_as_an_int():
    assert ModelConfig(**SMALL, position_axes=[4, 8], dropout=0).position_axes == (4, 8)  # from config.json


# ---------------------------------------------------------------- SparseTransformer

@pytest.mark.parametrize("config,message", [
    (TrainConfig(), r"config must be a sparse_transformer ModelConfig \(pass its .model\), got TrainConfig"),
    ({"n_layer": 1}, r"config must be a sparse_transformer ModelConfig, got dict"),
    (None, r"config must be a sparse_transformer ModelConfig, got NoneType"),
])
def test_model_constructor_refuses_what_is_not_a_model_config(config, message):
    with pytest.raises(ValueError, match=message):  # was an AttributeError ('d_model')
        SparseTransformer(config)


def test_model_constructor_refuses_a_pattern_that_is_not_a_pattern():
    # Was accepted, and failed only at the first forward pass.
    with pytest.raises(ValueError, match=r"pattern must be a pattern from st.patterns .*got str 'strided'"):
        SparseTransformer(ModelConfig(**SMALL), pattern="strided")


@pytest.mark.parametrize("tokens,message", [
    ([[1, 2, 3]], r"tokens must be a 2-D integer tensor \[B, N\] of bytes, got list"),  # AttributeError
    (torch.zeros(4, dtype=torch.long), r"got a 1-D torch.int64 tensor"),  # "not enough values to unpack"
    (torch.zeros(1, 4), r"got a 2-D torch.float32 tensor"),  # was truncated to bytes silently
    (torch.zeros(0, 4, dtype=torch.long), r"at least one sequence \(B >= 1\), got shape \(0, 4\)"),  # reshape
    (torch.full((1, 4), 256), r"tokens must be bytes in \[0, 256\), got \[256, 256\]"),  # IndexError
    (torch.full((1, 4), -1), r"tokens must be bytes in \[0, 256\), got \[-1, -1\]"),
])
def test_model_forward_names_bad_tokens(tokens, message):
    with pytest.raises(ValueError, match=message):
        small_model()(tokens)


# ---------------------------------------------------------------- generate

@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    # Was: "probability tensor contains either inf, nan" after the prefill (and a traceback from `sample`).
    model, prime = small_model(), torch.tensor([[1, 2]])
    assert torch.equal(generate(model, prime, 5, temperature=temperature), generate(model, prime, 5, temperature=0))


def test_generate_takes_numpy_numbers():
    np = pytest.importorskip("numpy")
    # Were refused as "temperature must be a finite number >= 0 (0: greedy), got np.float32(0.5)".
    out = generate(small_model(), torch.tensor([[1, 2]]), np.int64(3), temperature=np.float32(0.5),
                   top_k=np.int64(5), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 5)


def test_generate_refuses_timings_that_are_not_a_dict():
    with pytest.raises(ValueError, match="timings must be a dict to fill, or None, got list"):  # TypeError
        generate(small_model(), torch.tensor([[1, 2]]), 3, timings=[])


# ---------------------------------------------------------------- save_pretrained / from_pretrained

def test_save_pretrained_refuses_an_empty_path_or_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("mine")
    model = small_model()
    with pytest.raises(ValueError, match="path must name a folder, got ''"):  # wrote into the current folder
        model.save_pretrained("")
    assert (tmp_path / "config.json").read_text() == "mine" and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="path must name a folder, got None"):  # TypeError
        model.save_pretrained(None)
    with pytest.raises(ValueError, match=r"config.json is a file; expected a folder"):  # FileExistsError
        model.save_pretrained(tmp_path / "config.json")


@pytest.mark.parametrize("device", ["gpu0", "meta", "cuda:x"])  # ("gpu" alone would mark it a GPU test)
def test_from_pretrained_names_a_bad_device(tmp_path, device):
    # "gpu0" was a RuntimeError; "meta" blamed the file ("not a readable safetensors file (truncated or corrupt?)").
    folder = saved(tmp_path)
    with pytest.raises(ValueError, match=f"device must be cpu, cuda or cuda:N, got '{device}'"):
        SparseTransformer.from_pretrained(folder, device=device)
    with pytest.raises(ValueError, match="path must name a folder, got None"):
        SparseTransformer.from_pretrained(None)


def test_from_pretrained_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ValueError, match="no CUDA GPU is available here"):  # was an AssertionError
        SparseTransformer.from_pretrained("anywhere", device="cuda")


# ---------------------------------------------------------------- eval, sample, patterns

def test_eval_and_sample_refuse_the_meta_device(tmp_path, capsys):
    folder = saved(tmp_path)
    for command in (["eval"], ["sample", "--out", str(tmp_path / "o")]):
        one_line_error(capsys, [*command, "--checkpoint", str(folder), "--device", "meta", "--no-progress"],
                       "device must be cpu, cuda or cuda:N, got 'meta'")
    assert not (tmp_path / "o").exists()


def test_sample_at_a_tiny_temperature_is_not_a_traceback(tmp_path, capsys):
    folder = saved(tmp_path)
    assert main(["sample", "--checkpoint", str(folder), "--n", "1", "--steps", "4", "--temperature", "1e-300",
                 "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert "==== sample 0 ====" in capsys.readouterr().out and (tmp_path / "o" / "samples.txt").is_file()


def test_sample_refuses_an_empty_out_and_a_data_nothing_reads(tmp_path, capsys, monkeypatch):
    folder = saved(tmp_path)
    monkeypatch.chdir(tmp_path)
    base = ["sample", "--checkpoint", str(folder), "--n", "1", "--steps", "4", "--no-progress"]
    one_line_error(capsys, [*base, "--out", ""], "--out must name a folder for the samples, got an empty string")
    assert not (tmp_path / "samples.txt").exists()  # was written into the current folder
    one_line_error(capsys, [*base, "--out", "o", "--data", "images.raw"],
                   "--data has no effect without --complete-images")  # was ignored
    assert not (tmp_path / "o").exists()


@pytest.fixture
def memory_cap():
    """At most 4 GB more address space while the test runs (so the fault fails it, not the machine)."""
    resource = pytest.importorskip("resource")
    try:
        size = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:"))) * 1024
    except OSError:
        pytest.skip("no /proc/self/status")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + 4 * 2 ** 30
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_huge_n_does_not_list_a_file_name_per_sample(tmp_path, capsys, monkeypatch, memory_cap):
    """--n 10**11 built a list of 10**11 wav names (audio or not) and filled the memory before anything
    (the machine's OOM killer ended the command, silently)."""
    import sparse_transformer.sampling

    def stop(*args, **kwargs):
        raise ValueError("reached generate")

    monkeypatch.setattr(sparse_transformer.sampling, "generate", stop)
    text = saved(tmp_path / "text")
    one_line_error(capsys, ["sample", "--checkpoint", str(text), "--n", str(10 ** 11), "--steps", "4",
                            "--no-progress", "--out", str(tmp_path / "o")], "reached generate")
    audio = saved(tmp_path / "audio", dataset="audio")
    out = tmp_path / "waves"
    out.mkdir()
    for name in ("sample-0.wav", "sample-12.wav", "sample-x.wav", "notes.txt"):
        (out / name).write_bytes(b"mine")
    one_line_error(capsys, ["sample", "--checkpoint", str(audio), "--n", str(10 ** 11), "--no-progress",
                            "--out", str(out)], "already holds sample-0.wav, sample-12.wav; pass --force")
    one_line_error(capsys, ["sample", "--checkpoint", str(audio), "--n", "5", "--no-progress",
                            "--out", str(out)], "already holds sample-0.wav; pass")  # 12 is not in the way of 5
    one_line_error(capsys, ["sample", "--checkpoint", str(audio), "--n", "5", "--no-progress", "--force",
                            "--out", str(out)], "reached generate")
    assert all((out / name).read_bytes() == b"mine" for name in ("sample-0.wav", "sample-12.wav"))


def test_patterns_refuses_a_query_without_a_drawing(capsys):
    one_line_error(capsys, ["patterns", "--n", "16", "--query", "5"], "--query has no effect without --out")
    assert main(["patterns", "--n", "16", "--query", "16"]) == 2  # out of range: still named as such
    assert "--query must be in [0, 15]" in capsys.readouterr().err


@pytest.mark.parametrize("fields,message", [
    (dict(recompute="false"), r"recompute must be true or false, got 'false'"),  # truthy: was obeyed
    (dict(compile=1), r"compile must be true or false, got 1"),
])
def test_train_config_names_a_switch_that_is_not_a_bool(fields, message):
    from sparse_transformer.config import TrainConfig
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)
    assert TrainConfig(recompute=True, compile=None).compile is None  # None: on with a GPU, off on the CPU


def test_the_public_sampling_helpers_check_their_options():
    from sparse_transformer.sampling import filter_logits, sample_next
    logits = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"top_k must be None or an int >= 1, got 0"):  # was an IndexError
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be None or a number in \(0, 1\], got 1.5"):
        sample_next(logits, top_p=1.5)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0"):
        sample_next(logits, temperature=float("nan"))
    assert sample_next(logits, temperature=0).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("shape", ["0x6", "12288x0", "12288"])
def test_bench_train_names_a_bad_shape_before_the_gpu_check(capsys, shape):
    """A typo in --shapes was named only on a GPU machine; elsewhere the GPU check hid it."""
    one_line_error(capsys, ["bench", "train", "--shapes", shape], f"--shapes: expected CONTEXTxBATCH of positive "
                                                                  f"sizes such as 12288x6, got '{shape}'")
