"""Audio: 8-bit mu-law encode/decode, WAV/FLAC decoding, mono mix, resampling to 12 kHz, split by file."""

import numpy as np
import pytest

from sparse_transformer.data import load
from sparse_transformer.data.audio import mu_law_decode, mu_law_encode, read_mono

soundfile = pytest.importorskip("soundfile", reason="audio tests need soundfile (pip install -e \".[data]\")")


def test_mu_law_known_values():
    # encode: floor((F(x) + 1) / 2 * 255 + 0.5), F(x) = sign(x) ln(1 + 255|x|) / ln(256).
    # x = 0.5: F = ln(128.5) / ln(256) = 0.875703 -> 239.096 + 0.5 -> 239; x = -0.5 -> 15.85 + 0.5 -> 16;
    # x = 0.001: F = ln(1.255) / ln(256) = 0.040961 -> 132.72 + 0.5 -> 133.
    x = np.array([-1.0, -0.5, 0.0, 0.001, 0.5, 1.0, 3.0, -7.0])
    assert mu_law_encode(x).tolist() == [0, 16, 128, 133, 239, 255, 255, 0]  # out of range: clipped
    assert mu_law_encode(x).dtype == np.uint8
    # decode(q) = sign(y) (256^|y| - 1) / 255 with y = 2q/255 - 1: the ends are -1 and 1, and
    # code 128 is y = 1/255 -> (256^(1/255) - 1) / 255 = 8.6213e-05.
    d = mu_law_decode(np.array([0, 128, 255], np.uint8))
    assert d[0] == pytest.approx(-1.0, abs=1e-12) and d[2] == pytest.approx(1.0, abs=1e-12) and d[1] == pytest.approx(8.6213e-05, rel=1e-4)


def test_mu_law_round_trip_error_bound():
    x = np.linspace(-1, 1, 200_001)
    q = mu_law_encode(x)
    assert np.all(np.diff(q.astype(int)) >= 0)  # monotone
    assert len(np.unique(q)) == 256  # every code is used
    err = np.abs(mu_law_decode(q) - x)
    # Quantization error is at most half a step (1/255) in the companded domain; |dx/dF| =
    # ln(256) (1 + 255|x|) / 255 grows by at most 256^(1/255) across that half step.
    bound = (1 / 255) * np.log(256) / 255 * (1 + 255 * np.abs(x)) * 256 ** (1 / 255)
    assert np.all(err <= bound + 1e-12)
    assert err.max() > 0.5 * bound.max()  # the bound is not vacuous
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(mu_law_encode(mu_law_decode(codes)), codes)  # decode then encode is exact


def sine(rate, seconds, hz, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * hz * t)


def test_audio_folder_resampled_mono_split_by_file(tmp_path):
    src = tmp_path / "music"
    src.mkdir()
    left = sine(16_000, 0.5, 1000)
    soundfile.write(src / "a.wav", np.stack([left, left], 1), 16_000, subtype="FLOAT")  # stereo 16 kHz
    b = sine(12_000, 0.25, 440, 0.8)
    soundfile.write(src / "b.flac", b, 12_000)  # mono FLAC already at 12 kHz
    c = sine(44_100, 0.2, 300)
    soundfile.write(src / "c.wav", np.stack([c, -c], 1), 44_100, subtype="FLOAT")  # channels cancel
    (src / "readme.txt").write_text("ignored")
    d = load("audio", src, cache=tmp_path / "cache")
    assert d.kind == "audio"
    # Split by file (sorted): a -> train, b -> validation, c -> test; lengths scale by 12k / rate.
    assert (len(d.train), len(d.validation), len(d.test)) == (6000, 3000, 2400)
    a12 = mu_law_decode(d.train)
    spectrum = np.abs(np.fft.rfft(a12))
    assert np.argmax(spectrum) * 12_000 / len(a12) == pytest.approx(1000, abs=2)  # pitch kept
    assert np.abs(a12[100:-100]).max() == pytest.approx(0.5, abs=0.03)  # level kept
    flac, _ = soundfile.read(src / "b.flac")
    np.testing.assert_array_equal(d.validation, mu_law_encode(flac))  # no resampling at 12 kHz
    assert set(np.asarray(d.test).tolist()) == {128}  # left + right = silence
    at8k = load("audio", src, cache=tmp_path / "cache", sample_rate=8000)
    assert len(at8k.train) == 4000


def test_one_recording_is_split_by_time(tmp_path):
    x = sine(12_000, 1.0, 440)
    soundfile.write(tmp_path / "one.wav", x, 12_000, subtype="FLOAT")
    d = load("audio", tmp_path / "one.wav", cache=tmp_path / "cache")
    assert (len(d.train), len(d.validation), len(d.test)) == (10_800, 600, 600)  # 90/5/5 of 12,000 samples
    np.testing.assert_array_equal(np.concatenate([d.train, d.validation, d.test]), mu_law_encode(x))
    soundfile.write(tmp_path / "two.wav", x, 12_000, subtype="FLOAT")  # a folder of two: still by time
    folder = load("audio", tmp_path, cache=tmp_path / "cache")
    assert len(folder.train) + len(folder.validation) + len(folder.test) == 24_000 and len(folder.test) == 1_200


def test_bad_audio_inputs(tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(ValueError, match="broken.wav: cannot decode as WAV/FLAC audio"):
        read_mono(tmp_path / "broken.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0), 12_000)
    with pytest.raises(ValueError, match="empty.wav: audio file holds no samples"):
        read_mono(tmp_path / "empty.wav")
    folder = tmp_path / "set"
    folder.mkdir()
    for k in range(3):
        soundfile.write(folder / f"{k}.wav", sine(12_000, 0.1, 200), 12_000)
    (folder / "1.wav").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="1.wav: cannot decode"):
        load("audio", folder, cache=tmp_path / "c")
    assert not any((tmp_path / "c").glob("*/manifest.json"))  # nothing prepared from bad input
    with pytest.raises(ValueError, match="empty.wav: audio file holds no samples"):
        load("audio", tmp_path / "empty.wav", cache=tmp_path / "c")
    for rate in (0, -5):  # 0 was read as "the default" by load(), and resampled to nothing by load_audio
        with pytest.raises(ValueError, match=f"sample_rate must be an int >= 1 \\(Hz\\), got {rate}"):
            load("audio", folder, cache=tmp_path / "c", sample_rate=rate)
    with pytest.raises(ValueError, match="found none"):
        load("audio", tmp_path / "c")
