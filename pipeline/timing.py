"""Timing accuracy (ours, not the paper's): does the audio end when it was asked to?

    audio (C, N) -> 100 ms frames -> RMS over the frame's channels and samples -> last frame above peak - 40 dB
                 -> its end in seconds, compared with the requested seconds_total

Arrays only; :func:`pipeline.metrics.timing_accuracy` applies it to files, the diffusion loop to its own samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

TIMING_FRAME_SECONDS = 0.1
TIMING_THRESHOLD_DB = -40.0  # relative to the file's peak sample


def nonsilent_seconds(
    audio: np.ndarray,
    sample_rate: int,
    frame_seconds: float = TIMING_FRAME_SECONDS,
    threshold_db: float = TIMING_THRESHOLD_DB,
) -> float:
    """End (s) of the last frame whose RMS is above ``threshold_db`` relative to the file's peak sample.

    audio (C, N): RMS pools all channels of a frame. Frames tile the file from 0 (the last may be short); a
    silent file gives 0.0. The result is capped at the file's length.
    """
    audio = np.asarray(audio, dtype=np.float64)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return 0.0
    hop = max(1, round(frame_seconds * sample_rate))
    n = audio.shape[-1]
    starts = np.arange(0, n, hop)
    energy = np.add.reduceat((audio**2).sum(axis=0), starts)  # (frames,) summed over channels and samples
    counts = np.diff(np.append(starts, n)) * audio.shape[0]
    rms = np.sqrt(energy / counts)
    loud = np.flatnonzero(rms > peak * 10.0 ** (threshold_db / 20.0))
    return 0.0 if loud.size == 0 else min((loud[-1] + 1) * hop, n) / sample_rate


@dataclass
class TimingAccuracy:
    median_abs_error_s: float  # median over files of |non-silent seconds - requested seconds_total|
    within_tolerance: float  # share of files (0..1) whose error is at most tolerance_s
    tolerance_s: float  # 1 s
    count: int  # files measured
    per_file: list[dict] = field(default_factory=list)  # requested_s, nonsilent_s, abs_error_s per file


def timing_summary(
    nonsilent_s: Sequence[float], seconds_total: Sequence[float], tolerance_s: float = 1.0
) -> TimingAccuracy:
    """:class:`TimingAccuracy` from measured non-silent lengths (see :func:`nonsilent_seconds`) and requests."""
    if len(nonsilent_s) != len(seconds_total) or not nonsilent_s:
        raise ValueError(f"need one requested length per measurement, got {len(seconds_total)} and {len(nonsilent_s)}")
    rows = [
        {"requested_s": float(requested), "nonsilent_s": float(measured), "abs_error_s": abs(measured - requested)}
        for measured, requested in zip(nonsilent_s, seconds_total, strict=True)
    ]
    errors = np.array([r["abs_error_s"] for r in rows])
    return TimingAccuracy(
        median_abs_error_s=float(np.median(errors)),
        within_tolerance=float(np.mean(errors <= tolerance_s)),
        tolerance_s=tolerance_s,
        count=len(rows),
        per_file=rows,
    )
