"""Raw audio as bytes: WAV/FLAC files, mono, resampled to 12 kHz, 8-bit mu-law (paper, section 7.4).

Files are read with soundfile, mixed to mono, resampled with ``scipy.signal.resample_poly`` (a
polyphase filter with anti-aliasing), mu-law encoded and concatenated in sorted path order. With three
files or more the split is by file (whole recordings go to train, validation or test), so no piece of
music is in two splits; one or two recordings are split by time instead, 90/5/5 like a text stream.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .dataset import ByteDataset, split_files, split_stream
from .download import cache_dir
from .store import SPLITS, SplitWriter, files_fingerprint, list_files, prepared

SAMPLE_RATE = 12_000
MU = 255
AUDIO_SUFFIXES = (".wav", ".flac")


def mu_law_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """Samples in [-1, 1] -> uint8 codes 0..mu (ITU-T G.711 companding; same formula as
    ``torchaudio.functional.mu_law_encoding``): ``floor((F(x) + 1) / 2 * mu + 0.5)`` with
    ``F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)``. Values outside [-1, 1] are clipped."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    f = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.floor((f + 1) / 2 * mu + 0.5).astype(np.uint8)


def mu_law_decode(q: np.ndarray, mu: int = MU) -> np.ndarray:
    """uint8 codes -> samples in [-1, 1] (float64), the inverse of :func:`mu_law_encode` up to quantization."""
    y = 2 * np.asarray(q, dtype=np.float64) / mu - 1
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def read_mono(file: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One audio file as mono float64 samples at ``sample_rate`` Hz (channels averaged)."""
    import soundfile
    from scipy.signal import resample_poly

    try:
        samples, rate = soundfile.read(str(file), dtype="float64", always_2d=True)  # (frames, channels)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: cannot decode as WAV/FLAC audio ({err})") from err
    if len(samples) == 0:
        raise ValueError(f"{file}: audio file holds no samples")
    mono = samples.mean(axis=1)
    if rate != sample_rate:
        g = math.gcd(int(rate), sample_rate)
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    return mono


def audio_files(path: Path) -> list[Path]:
    """A WAV/FLAC file, or all of them under a folder in sorted path order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = list_files(path, AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: expected a WAV/FLAC file or a folder containing some, found none")
    return files


def load_audio(path: Path, cache: Optional[Path] = None, sample_rate: int = SAMPLE_RATE) -> ByteDataset:
    """WAV/FLAC files under ``path`` (or one file) as an 8-bit mu-law stream at ``sample_rate``,
    split by file (3 files or more) or else by time, 90/5/5.

    Each split is the concatenation of its files' encoded samples; context-length windows are cut
    from it by the batching code. Converted once into the cache and memory-mapped afterwards.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        # 0 "resampled" every file to nothing useful without an error
        raise ValueError(f"sample_rate must be an int >= 1 (Hz), got {sample_rate!r}")
    path = Path(path).expanduser().resolve()
    files = audio_files(path)
    by_file = len(files) >= 3
    fingerprint = f"audio-{sample_rate}-{'file' if by_file else 'time'}-{files_fingerprint(files)}"
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:10]

    def build(folder: Path) -> None:
        with SplitWriter(folder) as writer:
            if by_file:
                groups = split_files(files)
                for split, group in groups.items():
                    for f in group:
                        writer.write(split, mu_law_encode(read_mono(f, sample_rate)))
                sources = {s: [str(f) for f in g] for s, g in groups.items()}
            else:  # too few recordings to keep whole: cut the one stream by time
                stream = np.concatenate([mu_law_encode(read_mono(f, sample_rate)) for f in files])
                parts = split_stream(stream, str(path), "audio")
                for split in SPLITS:
                    writer.write(split, parts.split(split))
                sources = {"by time": [str(f) for f in files]}
            writer.finish("audio", "audio", fingerprint, sample_rate=sample_rate, source=str(path), files=sources)

    return prepared(Path(cache or cache_dir()) / f"audio{sample_rate}-{tag}", fingerprint, build)
