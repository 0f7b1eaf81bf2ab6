"""Decoding any input to 44.1 kHz stereo float32, and cutting it into segments.

    file (wav/flac/ogg/mp3, any rate, C channels)
      ─ soundfile, in blocks ─→ (frames, C) float32 ─ to stereo ─→ (frames, 2) ─ soxr stream ─→ (2, N) @ 44.1 kHz
      ─ split every max_seconds ─→ segments (2, n_k) with offset_seconds = start_k / 44100

The decoded length is fixed to ``N = round(frames · 44100 / rate)`` (soxr's streaming tail can differ by a few
samples), so latent shapes follow from the source alone. The source is read block by block; memory holds the
44.1 kHz stereo result (about 21 MB per minute of audio), not the source at its own rate and width, and never
more than ``max_input_seconds`` of it: the header's rate, channels and length are checked before any sample is
read (a 2 MB WAV declaring 1 Hz would otherwise be upsampled 44,100x into hundreds of GB), and the frames read
are counted against the same bound in case the header under-declares.

A bad file raises :class:`AudioError`, whose ``reason`` is ``"category: detail"``: ``empty``, ``truncated``,
``decode``, ``nonfinite``, ``bad-header`` or ``too-long``. Those go to ``errors.jsonl``; any other exception is a
failure of the job, not of the file.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from pipeline.config import PreprocessConfig

SAMPLE_RATE = 44100
BLOCK_FRAMES = 1 << 16
# Longer inputs are refused: 2 h decodes to about 2.5 GB at 44.1 kHz stereo. The job reads it from its config.
MAX_INPUT_SECONDS = PreprocessConfig.model_fields["max_input_seconds"].default
# Rates and channel counts no real recording has; outside them a header is lying (or the file is not audio), and
# believing it costs unbounded memory: 1 Hz upsamples 44,100x, 65,535 channels make one block 17 GB.
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1000, 768_000
MAX_CHANNELS = 64
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


def _check_header(rate: int, channels: int, declared: int, max_input_seconds: float) -> None:
    """Refuse a header whose numbers would make decoding unbounded, before a single block is read."""
    if rate <= 0 or channels <= 0:
        raise AudioError(f"decode: {rate} Hz, {channels} channels")
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioError(f"bad-header: declares {rate} Hz (readable: {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz)")
    if channels > MAX_CHANNELS:
        raise AudioError(f"bad-header: declares {channels} channels (readable: up to {MAX_CHANNELS})")
    if declared > 0 and declared / rate > max_input_seconds:
        seconds = declared / rate
        raise AudioError(f"too-long: header declares {seconds:.0f} s, max_input_seconds is {max_input_seconds:g}")


def _fill(audio: np.ndarray, start: int, chunk: np.ndarray, overflow: list[np.ndarray]) -> int:
    """Copy (k, 2) ``chunk`` into (2, N) ``audio`` at ``start``; what lies past N goes to ``overflow``. Returns the
    new end. Filling one array sized from the header, not concatenating blocks, keeps the peak at one result."""
    fits = max(0, min(len(chunk), audio.shape[1] - start))
    audio[:, start : start + fits] = chunk[:fits].T
    if fits < len(chunk):
        overflow.append(chunk[fits:])
    return start + len(chunk)


def _fit(audio: np.ndarray, overflow: list[np.ndarray], n: int) -> np.ndarray:
    """The (2, N) buffer and its overflow as one contiguous (2, n), cut or zero-padded; a copy only when n != N
    (soxr's tail, or a header that did not count the frames right)."""
    if audio.shape[1] == n:
        return audio
    audio = np.concatenate([audio, *(part.T for part in overflow)], axis=1)
    if audio.shape[1] >= n:
        return np.ascontiguousarray(audio[:, :n])
    return np.pad(audio, ((0, 0), (0, n - audio.shape[1])))


def decode(path: str, max_input_seconds: float = MAX_INPUT_SECONDS) -> Decoded:
    """Decode ``path`` to 44.1 kHz stereo float32 (2, N); raise :class:`AudioError` for a bad file.

    Inputs longer than ``max_input_seconds`` are refused (``too-long``) without decoding more than that."""
    if os.path.getsize(path) == 0:
        raise AudioError("empty: zero-byte file")
    try:
        with sf.SoundFile(path) as fh:
            rate, channels, declared = fh.samplerate, fh.channels, fh.frames
            _check_header(rate, channels, declared, max_input_seconds)
            max_frames = math.floor(max_input_seconds * rate)
            mix = stereo_matrix(channels)
            stream = soxr.ResampleStream(rate, SAMPLE_RATE, 2, dtype="float32") if rate != SAMPLE_RATE else None
            audio = np.zeros((2, round(max(declared, 0) * SAMPLE_RATE / rate)), np.float32)  # (2, N) from the header
            overflow: list[np.ndarray] = []
            frames = written = 0
            while True:
                block = fh.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                last = len(block) < BLOCK_FRAMES
                if not np.isfinite(block).all():
                    raise AudioError(f"nonfinite: NaN or inf samples near second {frames / rate:.1f}")
                frames += len(block)
                if frames > max_frames:  # the header under-declared (or gave no length): stop at the bound
                    raise AudioError(f"too-long: more than max_input_seconds ({max_input_seconds:g} s) of audio")
                stereo = block @ mix  # (n, 2)
                resampled = stream.resample_chunk(stereo, last=last) if stream else stereo  # (k, 2) @ 44.1 kHz
                written = _fill(audio, written, resampled, overflow)
                if last:
                    break
    except sf.LibsndfileError as exc:
        raise AudioError(f"decode: {_libsndfile_reason(exc)}") from None
    except AudioError:
        raise
    except (RuntimeError, ValueError) as exc:  # older soundfile's decoder errors; soxr's refusals
        raise AudioError(f"decode: {type(exc).__name__}: {exc}") from None
    if frames == 0:
        raise AudioError("empty: no audio frames")
    if declared > 0 and frames < declared * 0.99:  # mp3/ogg headers count frames; a cut file decodes fewer
        raise AudioError(f"truncated: header declares {declared} frames, {frames} decoded")
    shortfall = _wav_shortfall(path)
    if shortfall:
        raise AudioError(shortfall)
    n = round(frames * SAMPLE_RATE / rate)
    if n == 0:  # e.g. 1 frame at 96 kHz: no segment, no sample, so it must be an error line, not silence
        raise AudioError(f"empty: {frames} frames at {rate} Hz are 0 samples at {SAMPLE_RATE} Hz")
    return Decoded(_fit(audio, overflow, n), rate, channels, frames)


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
