"""Audio fixtures for the preprocess tests, generated into tmp dirs (nothing is read from or written to the repo).

Imported by the test modules as ``preprocess_fixtures`` (pytest puts this rootless test directory on sys.path).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline import storage

SR44 = 44100


@dataclass
class Expected:
    """What preprocessing must make of one good input: computed with soundfile alone, not with project code."""

    name: str
    frames: int
    rate: int
    sha256: str

    @property
    def samples_44k(self) -> int:
        return round(self.frames * SR44 / self.rate)

    @property
    def seconds_total(self) -> int:
        return math.ceil(self.frames / self.rate)

    def segments(self, max_seconds: float) -> list[tuple[float, int]]:
        """(offset_seconds, samples at 44.1 kHz) of every segment."""
        length = round(max_seconds * SR44)
        n = self.samples_44k
        return [(start / SR44, min(length, n - start)) for start in range(0, n, length)]


def _noise(seconds: float, rate: int, channels: int, seed: int, amplitude: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * (220 + 40 * seed) * t)[:, None] * 0.5
    return ((tone + rng.standard_normal((len(t), channels)) * 0.3) * amplitude).astype(np.float32)


# name: (seconds, rate, channels, format, subtype)
GOOD = {
    "a_wav16_44k_stereo.wav": (0.5, 44100, 2, "WAV", "PCM_16"),
    "b_wav24_96k_stereo.wav": (1.2, 96000, 2, "WAV", "PCM_24"),
    "c_flac_48k_mono.flac": (2.0, 48000, 1, "FLAC", "PCM_16"),
    "d_ogg_22k_stereo.ogg": (1.5, 22050, 2, "OGG", "VORBIS"),
    "e_mp3_32k_mono.mp3": (1.0, 32000, 1, "MP3", "MPEG_LAYER_III"),
    "f_wav_48k_6ch.wav": (1.0, 48000, 6, "WAV", "PCM_16"),
    "g_flac_16k_stereo.flac": (3.0, 16000, 2, "FLAC", "PCM_24"),
    "sub/h_wav_8k_mono_4min.wav": (240.0, 8000, 1, "WAV", "PCM_16"),
}
BAD = {  # name: reason category expected in errors.jsonl
    "x_zero_bytes.wav": "empty",
    "x_truncated.flac": "decode",
    "x_truncated_header.wav": "truncated",
    "x_text.wav": "decode",
    "x_nan.wav": "nonfinite",
    "x_one_hz.wav": "bad-header",  # issue 15: a rate that would upsample 44,100x
    "x_one_frame_96k.wav": "empty",  # issue 15: 0 samples at 44.1 kHz
}


def write_mixed_inputs(root: Path) -> tuple[dict[str, Expected], dict[str, str]]:
    """The mixed input set of issue 4: good files of every format/rate/layout plus bad ones, with captions from
    a root manifest (some with extra columns) and sidecars (.txt and .json) for the rest."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i, (name, (seconds, rate, channels, fmt, subtype)) in enumerate(GOOD.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        amplitude = 0.01 if seconds > 60 else 0.2
        sf.write(path, _noise(seconds, rate, channels, i, amplitude), rate, format=fmt, subtype=subtype)
        frames = len(sf.read(path, dtype="float32")[0])  # decoded frames (mp3/ogg: what the decoder gives back)
        expected[name] = Expected(name, frames, rate, hashlib.sha256(path.read_bytes()).hexdigest())
    flac = root / "good_for_truncation.flac"
    sf.write(flac, _noise(3.0, 44100, 2, 99), 44100, format="FLAC")
    data = flac.read_bytes()
    flac.unlink()
    (root / "x_truncated.flac").write_bytes(data[: len(data) // 2])
    wav = root / "x_truncated_header.wav"
    sf.write(wav, _noise(2.0, 44100, 2, 98), 44100, subtype="PCM_16")
    wav.write_bytes(wav.read_bytes()[:-50000])
    (root / "x_zero_bytes.wav").write_bytes(b"")
    (root / "x_text.wav").write_text("this is not audio, only a text file named .wav\n" * 20)
    nan = _noise(1.0, 44100, 2, 97)
    nan[1000:1010] = np.nan
    sf.write(root / "x_nan.wav", nan, 44100, subtype="FLOAT")
    sf.write(root / "x_one_hz.wav", _noise(100.0, 1, 2, 96), 1, subtype="PCM_16")
    sf.write(root / "x_one_frame_96k.wav", _noise(1 / 96000, 96000, 2, 95), 96000, subtype="PCM_16")

    manifest = [
        {"path": "a_wav16_44k_stereo.wav", "caption": "a short stereo blip", "genre": "test", "bpm": 120},
        {"path": "b_wav24_96k_stereo.wav", "caption": "high rate noise", "genre": "noise", "bpm": None},
        {"path": "e_mp3_32k_mono.mp3", "caption": "an mp3 hum", "genre": "hum", "bpm": 90},
        {"path": "sub/h_wav_8k_mono_4min.wav", "caption": "four quiet minutes", "genre": "ambient", "bpm": 60},
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in manifest))
    (root / "c_flac_48k_mono.txt").write_text("a mono flac tone\n")
    (root / "d_ogg_22k_stereo.json").write_text(json.dumps({"caption": "ogg at 22 kHz", "mood": "calm"}))
    return expected, BAD


def write_clips(root: Path, count: int, seconds: float = 2.0) -> dict[str, Expected]:
    """``count`` short stereo 44.1 kHz wav clips of slightly different lengths, with .txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(count):
        name = f"clip_{i:03d}.wav"
        path = root / name
        sf.write(path, _noise(seconds + 0.1 * i, SR44, 2, i), SR44, subtype="PCM_16")
        (root / f"clip_{i:03d}.txt").write_text(f"clip number {i}")
        expected[name] = Expected(name, len(sf.read(path)[0]), SR44, hashlib.sha256(path.read_bytes()).hexdigest())
    return expected


def upload_dir(local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_file(storage.join(prefix, path.relative_to(local).as_posix()), path)


def longplay_argv(*args: str) -> list[str]:
    """argv running ``longplay ARGS`` in a fresh interpreter."""
    return [sys.executable, "-m", "infra.cli", *args]
