"""The model: step-0 loss, causality, every pattern and integration mode, save/load."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_transformer import model as model_module
from sparse_transformer import patterns
from sparse_transformer.config import ModelConfig
from sparse_transformer.weights import load_model
from sparse_transformer.model import SparseTransformer, byte_loss, layer_patterns
from tolerances import assert_close

TINY = ModelConfig(n_layer=2, n_head=2, d_model=32, context=64, pattern="fixed", stride=8, summary=2)


def randomize_head(model):  # the zero logit projection hides everything else at init
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_step0_loss_is_8_bits_per_byte():
    torch.manual_seed(0)
    model = SparseTransformer(TINY)
    tokens = torch.randint(0, 256, (3, 64))
    bits = byte_loss(model(tokens), tokens).item() / math.log(2)
    assert abs(bits - 8.0) < 1e-5  # uniform over 256 bytes; fp32 rounding of ln 256 only
    assert model.head.weight.abs().sum() == 0


def test_init_statistics_follow_the_paper():
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, d_model=256, n_head=4)
    model = SparseTransformer(config)
    d = 256
    assert abs(model.token.weight.std().item() - math.sqrt(0.125 / d)) < 0.002
    assert abs(model.positions[0].weight.std().item() - math.sqrt(0.125 / (2 * d))) < 0.005
    fc2 = model.blocks[0].ff.proj
    assert abs(fc2.weight.std().item() - math.sqrt(0.125 / fc2.in_features)) < 0.001
    assert fc2.bias.abs().sum() == 0


@pytest.mark.parametrize("pattern", ["dense", "strided", "fixed"])
def test_causal_every_byte_predicted_from_earlier_bytes(pattern):
    torch.manual_seed(0)
    model = randomize_head(SparseTransformer(dataclasses.replace(TINY, pattern=pattern))).eval()
    a = torch.randint(0, 256, (1, 40))
    b = a.clone()
    b[0, 25:] = (b[0, 25:] + 1) % 256
    la, lb = model(a), model(b)
    assert torch.equal(la[0, :26], lb[0, :26])  # logits[t] depends only on tokens[:t]
    assert not torch.allclose(la[0, 26:], lb[0, 26:])


def test_backends_agree_inside_the_model():
    torch.manual_seed(0)
    model = randomize_head(SparseTransformer(dataclasses.replace(TINY, half_qk=True))).double()
    tokens = torch.randint(0, 256, (2, 50))
    fast = model(tokens)
    for block in model.blocks:
        block.attn.backend = "reference"
    assert_close(fast, model(tokens))


def test_layer_patterns_per_integration_mode():
    base = dataclasses.replace(TINY, n_layer=6, pattern="strided")
    merged = layer_patterns(base)
    assert all(p == (patterns.strided(8),) for p in merged)
    inter = layer_patterns(dataclasses.replace(base, integration="interleaved", interleave_ratio=2))
    assert [p[0].part for p in inter] == ["row", "row", "column"] * 2
    split = layer_patterns(dataclasses.replace(base, integration="split"))
    assert all([x.part for x in p] == ["row", "column"] for p in split)
    assert layer_patterns(dataclasses.replace(base, pattern="dense", integration="split"))[0] == (patterns.dense(),)


def _trains(model, steps=8):
    torch.manual_seed(1)
    tokens = torch.randint(0, 16, (4, 64)) * 7  # a small alphabet: learnable from the unigram alone
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = byte_loss(model(tokens), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    return losses


@pytest.mark.parametrize("pattern", ["dense", "strided", "fixed"])
@pytest.mark.parametrize("integration", ["merged", "interleaved", "split"])
def test_every_pattern_and_integration_trains(pattern, integration):
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, pattern=pattern, integration=integration, distinct=2, half_ff=True)
    _trains(SparseTransformer(config))


def test_custom_pattern_trains():
    window = patterns.custom(lambda b, h, q, k: q - k < 5, "window5", per_head=False)
    torch.manual_seed(0)
    model = SparseTransformer(TINY, pattern=window)
    assert all(block.attn.patterns == (window,) for block in model.blocks)
    _trains(model)


def test_image_positions_are_row_column_channel():
    config = dataclasses.replace(TINY, context=48, position_axes=(4, 4, 3), pattern="strided", stride=12)
    model = SparseTransformer(config)
    assert [t.num_embeddings for t in model.positions] == [4, 4, 3]
    idx = model.position_index
    assert idx[0].tolist() == [0, 0, 0] and idx[14].tolist() == [1, 0, 2] and idx[47].tolist() == [3, 3, 2]
    text = SparseTransformer(dataclasses.replace(TINY, context=60))  # stride 8: 8 rows x 8 columns
    assert [t.num_embeddings for t in text.positions] == [8, 8]
    assert text.position_index[19].tolist() == [2, 3]


def test_bad_lengths_raise():
    model = SparseTransformer(TINY)
    with pytest.raises(ValueError, match="context=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="position_axes"):
        dataclasses.replace(TINY, position_axes=(4, 4))


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize_head(SparseTransformer(dataclasses.replace(TINY, half_qk=True, dropout=0.1))).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    loaded = SparseTransformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    tokens = torch.randint(0, 256, (2, 30))
    assert torch.equal(model(tokens), loaded(tokens))
    with pytest.raises(ValueError, match="model.safetensors"):
        SparseTransformer.from_pretrained(tmp_path)


def older_state(model) -> dict:
    """``model``'s weights as versions before the joined qkv projection named them."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".attn.qkv." not in name:
            state[name] = tensor
            continue
        prefix, suffix = name.split(".attn.qkv.")
        qk, h, d = model.blocks[0].attn.qk_width, model.config.n_head, model.config.d_model
        per_head = tensor[qk:].unflatten(0, (h, -1))  # each head's key rows, then its value rows
        pieces = (tensor[:qk], per_head[:, :qk // h].flatten(0, 1), per_head[:, qk // h:].flatten(0, 1))
        for piece, part in zip(("query", "key", "value"), pieces):
            state[f"{prefix}.attn.{piece}.{suffix}"] = part.clone()
        assert pieces[2].shape[0] == d
    return state


def test_weights_of_the_older_separate_projections_load(tmp_path):
    """Folders written when q, k and v were three projections load into the joined one, with the
    same outputs; the header check adds their shapes up the same way."""
    from sparse_transformer.weights import save_weights

    torch.manual_seed(0)
    model = SparseTransformer(dataclasses.replace(TINY, half_qk=True)).eval()
    for p in model.parameters():  # biases start at zero: make every piece count
        p.data.normal_()
    old = older_state(model)
    assert "blocks.0.attn.query.weight" in old and not any(".qkv." in n for n in old)
    save_weights(tmp_path / "old", old, model.config)
    loaded = SparseTransformer.from_pretrained(tmp_path / "old").eval()
    tokens = torch.randint(0, 256, (2, 30))
    assert torch.equal(model(tokens), loaded(tokens))
    # What the old projections meant, written out: head j's queries, keys and values are rows
    # [j w, (j + 1) w) of query, key and value (w their width per head).
    seen = []
    real = model_module.sparse_attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "sparse_attention", lambda q, k, v, *a: seen.append((q, k, v)) or real(q, k, v, *a))
        loaded(tokens)
    x = loaded.blocks[0].norm_attn(loaded.embed(tokens))
    for got, piece in zip(seen[0], ("query", "key", "value")):
        want = F.linear(x, old[f"blocks.0.attn.{piece}.weight"], old[f"blocks.0.attn.{piece}.bias"])
        assert torch.allclose(got, want.view(2, 30, TINY.n_head, -1).transpose(1, 2), atol=1e-5)
    swapped = dict(old, **{"blocks.1.attn.key.weight": old["blocks.1.attn.value.weight"][:, :16].clone()})
    save_weights(tmp_path / "bad", swapped, model.config)
    with pytest.raises(ValueError, match=r"blocks.1.attn query \[16, 32\], key \[32, 16\] and value \[32, 32\] "
                                         r"cannot be one projection"):
        SparseTransformer.from_pretrained(tmp_path / "bad")
    both = dict(old, **{"blocks.0.attn.qkv.weight": model.state_dict()["blocks.0.attn.qkv.weight"]})
    save_weights(tmp_path / "both", both, model.config)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.weight and the older blocks.0.attn.query.weight .* "
                                         r"both present"):
        SparseTransformer.from_pretrained(tmp_path / "both")


def test_from_pretrained_names_the_bad_file(tmp_path):
    SparseTransformer(TINY).save_pretrained(tmp_path / "m")
    weights, config = tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()
    weights.write_bytes(good_weights[:100])  # truncated: safetensors' own error is no ValueError
    with pytest.raises(ValueError, match=r"m is damaged: model.safetensors does not match its manifest"):
        SparseTransformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()  # without the manifest: each file's own error
    with pytest.raises(ValueError, match=r"m has no manifest.json, so its files cannot be verified"):
        SparseTransformer.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"m/model.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "m", allow_unverified=True)
    weights.write_bytes(good_weights)
    config.write_text("{")
    with pytest.raises(ValueError, match=r"m/config.json: not a valid ModelConfig"):
        load_model(tmp_path / "m", allow_unverified=True)
    config.write_text(good_config.replace('"n_layer": 2', '"n_layer": 3'))  # weights of another shape
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the model in .*config.json: "
                                         r"missing blocks.2.norm_attn.weight"):
        load_model(tmp_path / "m", allow_unverified=True)



def test_model_pattern_takes_a_spec():
    """model.pattern is a name sized by stride/summary/distinct, or any spec string (issue 27)."""
    from sparse_transformer.config import TrainConfig, from_dict, override, to_dict
    spec = dataclasses.replace(TINY, pattern="local:6+column:8+global_tokens:3", n_head=3, d_model=48)
    merged = layer_patterns(spec)
    assert merged[0] == (patterns.local(6) | patterns.column(8) | patterns.global_tokens(3),)
    inter = layer_patterns(dataclasses.replace(spec, n_layer=8, integration="interleaved", interleave_ratio=2))
    assert [p[0].spec for p in inter[:4]] == ["global_tokens:3", "global_tokens:3", "local:6", "column:8"]
    split = layer_patterns(dataclasses.replace(spec, integration="split"))
    assert [p.spec for p in split[0]] == ["global_tokens:3", "local:6", "column:8"]
    torch.manual_seed(0)
    _trains(SparseTransformer(spec))
    # The old way and the spec build the same model; a checkpoint's config round-trips.
    old = dataclasses.replace(TINY, pattern="fixed", stride=8, summary=2, distinct=2)
    new = dataclasses.replace(TINY, pattern="fixed:8:2:2")
    assert layer_patterns(old) == layer_patterns(new)
    assert from_dict(ModelConfig, to_dict(spec)) == spec
    assert override(TrainConfig(), "model.pattern=local:16+global_tokens:4").model.pattern == "local:16+global_tokens:4"


@pytest.mark.parametrize("fields,message", [
    (dict(pattern="banded"), "model.pattern: pattern must be one of"),
    (dict(pattern="local:0"), "window must be >= 1"),
    (dict(pattern="local:3+column:4+block:5", integration="split", n_head=2), r"n_head >= 3"),
    (dict(pattern="fixed", stride=4, summary=5), r"summary must be in \[1, 4\]"),
])
def test_bad_model_patterns(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **fields)
