"""Decoding any input to 44.1 kHz stereo float32, and cutting it into segments.

    file (wav/flac/ogg/mp3, any rate, C channels)
      ─ soundfile, in blocks ─→ (frames, C) float32 ─ to stereo ─→ (frames, 2) ─ soxr stream ─→ (2, N) @ 44.1 kHz
      ─ split every max_seconds ─→ segments (2, n_k) with offset_seconds = start_k / 44100

The decoded length is fixed to ``N = round(frames · 44100 / rate)`` (soxr's streaming tail can differ by a few
samples), so latent shapes follow from the source alone. The source is read block by block; memory holds the
44.1 kHz stereo result (about 21 MB per minute of audio), not the source at its own rate and width.

A bad file raises :class:`AudioError`, whose ``reason`` is ``"category: detail"``: ``empty``, ``truncated``,
``decode`` or ``nonfinite``. Those go to ``errors.jsonl``; any other exception is a failure of the job, not of
the file.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 44100
BLOCK_FRAMES = 1 << 16
SQRT_HALF = math.sqrt(0.5)


class AudioError(ValueError):
    """The file is not usable audio; ``reason`` is ``"category: detail"`` for errors.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Decoded:
    """A whole input at 44.1 kHz stereo. ``audio`` is (2, N) float32."""

    audio: np.ndarray
    source_rate: int
    source_channels: int
    source_frames: int

    @property
    def seconds_total(self) -> int:
        """ceil(duration of the source file), as stable-audio-tools defines it."""
        return -(-self.source_frames // self.source_rate)


@dataclass
class Segment:
    """A piece of an input, (2, n) float32 at 44.1 kHz, starting ``offset_seconds`` into the source."""

    index: int
    audio: np.ndarray
    offset_seconds: float


# ----------------------------------------------------------------------------------------------- channels
def stereo_matrix(channels: int) -> np.ndarray:
    """(channels, 2) mixing matrix to stereo: mono is duplicated, stereo kept, 5.1 (WAV order FL FR FC LFE BL BR)
    mixed down with ITU-R BS.775 gains (centre and surrounds at -3 dB, LFE dropped) and normalised so a full-scale
    input cannot clip; any other layout is averaged into both sides (its channel positions are unknown)."""
    if channels == 1:
        return np.ones((1, 2), np.float32)
    if channels == 2:
        return np.eye(2, dtype=np.float32)
    if channels == 6:
        m = np.array([[1, 0], [0, 1], [SQRT_HALF, SQRT_HALF], [0, 0], [SQRT_HALF, 0], [0, SQRT_HALF]], np.float32)
        return m / m.sum(axis=0, keepdims=True)
    return np.full((channels, 2), 1.0 / channels, np.float32)


# ----------------------------------------------------------------------------------------------- decode
def _wav_shortfall(path: str) -> str | None:
    """libsndfile silently shortens a truncated WAV; compare the data chunk's declared size with the file's."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = os.path.getsize(path)
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                available = size - fh.tell()
                if length in (0, 0xFFFFFFFF) or length <= available:  # 0/-1: a streaming writer's placeholder
                    return None
                return f"truncated: data chunk declares {length} bytes, the file holds {available}"
            fh.seek(length + (length & 1), os.SEEK_CUR)


def _libsndfile_reason(exc: Exception) -> str:
    # error_string omits the (possibly temporary) local path that str(exc) contains
    return getattr(exc, "error_string", None) or type(exc).__name__


def decode(path: str) -> Decoded:
    """Decode ``path`` to 44.1 kHz stereo float32 (2, N); raise :class:`AudioError` for a bad file."""
    if os.path.getsize(path) == 0:
        raise AudioError("empty: zero-byte file")
    try:
        with sf.SoundFile(path) as fh:
            rate, channels, declared = fh.samplerate, fh.channels, fh.frames
            if rate <= 0 or channels <= 0:
                raise AudioError(f"decode: {rate} Hz, {channels} channels")
            mix = stereo_matrix(channels)
            stream = soxr.ResampleStream(rate, SAMPLE_RATE, 2, dtype="float32") if rate != SAMPLE_RATE else None
            parts, frames = [], 0
            while True:
                block = fh.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                last = len(block) < BLOCK_FRAMES
                if not np.isfinite(block).all():
                    raise AudioError(f"nonfinite: NaN or inf samples near second {frames / rate:.1f}")
                frames += len(block)
                stereo = block @ mix  # (n, 2)
                parts.append(stream.resample_chunk(stereo, last=last) if stream else stereo)
                if last:
                    break
    except sf.LibsndfileError as exc:
        raise AudioError(f"decode: {_libsndfile_reason(exc)}") from None
    except RuntimeError as exc:  # older soundfile raises plain RuntimeError for decoder errors
        raise AudioError(f"decode: {exc}") from None
    if frames == 0:
        raise AudioError("empty: no audio frames")
    if declared > 0 and frames < declared * 0.99:  # mp3/ogg headers count frames; a cut file decodes fewer
        raise AudioError(f"truncated: header declares {declared} frames, {frames} decoded")
    shortfall = _wav_shortfall(path)
    if shortfall:
        raise AudioError(shortfall)
    audio = np.concatenate(parts, axis=0).T  # (2, n)
    n = round(frames * SAMPLE_RATE / rate)
    if audio.shape[1] >= n:
        audio = audio[:, :n]
    else:
        audio = np.pad(audio, ((0, 0), (0, n - audio.shape[1])))
    return Decoded(np.ascontiguousarray(audio, np.float32), rate, channels, frames)


def segments(audio: np.ndarray, max_seconds: float) -> list[Segment]:
    """Split (2, N) into consecutive pieces of ``round(max_seconds · 44100)`` samples (the last may be shorter)."""
    length = max(1, round(max_seconds * SAMPLE_RATE))
    return [
        Segment(index=k, audio=audio[:, start : start + length], offset_seconds=start / SAMPLE_RATE)
        for k, start in enumerate(range(0, audio.shape[1], length))
    ]


def flac_bytes(audio: np.ndarray) -> bytes:
    """(2, n) float32 → 24-bit FLAC at 44.1 kHz (clipped to [-1, 1]: libsndfile would wrap, not clip)."""
    import io

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.T, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_24")
    return buf.getvalue()
