"""The paper's evaluation (Evans et al. 2024, §5.2): FD, KL, CLAP score, and our timing accuracy.

Every metric follows the published procedure (the authors' `stable-audio-metrics`) step by step; the networks that
turn audio into numbers are pluggable (:class:`FrameEmbedder`, :class:`Classifier`, :class:`TextAudioEmbedder`, see
`pipeline.embedders`). A figure is the paper's only when the paper's network computed it, so every
:class:`MetricsReport` names the embedder behind each number.

    FD     file -> peak -1 dBFS -> resample to the embedder's rate -> L and R embedded apart, concatenated per frame
           -> pool every frame of every file -> Gaussian (mu, Sigma) -> Fréchet distance to the reference's Gaussian
    KL     file -> mono -> resample -> peak -1 dBFS -> 10 s windows, 5 s hop -> logits averaged over windows
           -> softmax -> KL(reference || generated) per caption id -> mean over ids
    CLAP   file -> peak -1 dBFS -> audio embedding; prompt -> text embedding; cosine similarity -> mean over pairs
    timing file -> 100 ms frames -> last frame with RMS above peak - 40 dB -> its end vs the requested seconds_total
           (the measure on arrays is pipeline.timing)

Audio arrays are float32 (C, N): channels first, N samples, as everywhere in longplay.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import soundfile as sf
import soxr
from scipy import linalg
from scipy.special import softmax, xlogy

from pipeline.timing import TimingAccuracy, timing_summary
from pipeline.timing import nonsilent_seconds as nonsilent_seconds  # re-exported: the loops measure arrays with it

log = logging.getLogger(__name__)

AudioInput = str | os.PathLike | tuple[np.ndarray, int]  # a sound file, or (audio (C, N) float32, sample rate Hz)

PEAK_DBFS = -1.0  # every file is peak-normalised to this level before any embedder sees it (stable-audio-metrics)
KL_WINDOW_SECONDS = 10.0  # PaSST's training input length
KL_HOP_SECONDS = 5.0  # 10 s windows with 5 s overlap

# The embedders of the published table; only these names may be reported as FD_openl3, KL_passt, CLAP_LAION.
PAPER_EMBEDDERS: dict[str, str] = {
    "fd": "openl3-mel256-512-music",
    "kl": "passt-s-audioset",
    "clap_score": "laion-clap-630k-audioset-fusion",
}
PAPER_LABELS = {"fd": "FD_openl3", "kl": "KL_passt", "clap_score": "CLAP_LAION"}


# ---------------------------------------------------------------------------------------------------------------------
# Embedder interfaces


@runtime_checkable
class FrameEmbedder(Protocol):
    """Per-frame embeddings of one mono channel (FD). OpenL3: 1 s windows, 0.5 s hop, 512-d."""

    name: str
    sample_rate: int  # Hz the audio is resampled to before embed_frames

    def embed_frames(self, audio: np.ndarray) -> np.ndarray:
        """audio (N,) float32 mono at ``sample_rate`` -> (F, D) one row per analysis frame."""
        ...


@runtime_checkable
class Classifier(Protocol):
    """Class logits of fixed-length mono windows (KL). PaSST: 527 AudioSet classes at 32 kHz."""

    name: str
    sample_rate: int

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """windows (W, L) float32 mono at ``sample_rate`` -> (W, K) unnormalised logits."""
        ...


@runtime_checkable
class TextAudioEmbedder(Protocol):
    """A joint text-audio space (CLAP score)."""

    name: str
    sample_rate: int

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """B prompts -> (B, P)."""
        ...

    def embed_audio(self, audio: np.ndarray) -> np.ndarray:
        """audio (C, N) float32 at ``sample_rate`` -> (P,)."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Audio handling


def load_audio(item: AudioInput) -> tuple[np.ndarray, int]:
    """A path or an (audio, sample_rate) pair -> (audio (C, N) float32, sample rate Hz)."""
    if isinstance(item, tuple):
        audio, sr = item
        audio = np.asarray(audio, dtype=np.float32)
        return (audio[None] if audio.ndim == 1 else audio), int(sr)
    data, sr = sf.read(os.fspath(item), dtype="float32", always_2d=True)  # (N, C)
    return np.ascontiguousarray(data.T), int(sr)


def peak_normalize(audio: np.ndarray, peak_dbfs: float = PEAK_DBFS) -> np.ndarray:
    """Scale so that max |x| = 10^(peak_dbfs / 20) (-1 dBFS ≈ 0.891); an all-zero input is returned unchanged."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return audio
    return (audio * (10.0 ** (peak_dbfs / 20.0) / peak)).astype(np.float32)


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """(C, N) at sr_in -> (C, N') at sr_out (soxr, high quality); a no-op at equal rates."""
    if sr_in == sr_out:
        return audio
    return np.ascontiguousarray(soxr.resample(audio.T, sr_in, sr_out).T, dtype=np.float32)


def to_stereo(audio: np.ndarray) -> np.ndarray:
    """(C, N) -> (2, N): mono is copied to both sides (as stable-audio-metrics "fakes" stereo); C > 2 keeps L, R."""
    return np.repeat(audio, 2, axis=0) if audio.shape[0] == 1 else audio[:2]


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(C, N) -> (N,): the mean of the channels (librosa's mono=True)."""
    return audio.mean(axis=0)


# ---------------------------------------------------------------------------------------------------------------------
# FD


def gaussian_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frames (F, D) -> mean (D,) and unbiased covariance (D, D) over all F frames (F >= 2)."""
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 2 or frames.shape[0] < 2:
        raise ValueError(f"need (F, D) frames with F >= 2 for a covariance, got shape {frames.shape}")
    return frames.mean(axis=0), np.cov(frames, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2): ||mu1 - mu2||² + Tr(s1 + s2 - 2 (s1 s2)^½).

    mu (D,), s (D, D). sqrtm of a near-singular product can fail or come back complex: such a root is retried with
    ``eps`` added to both diagonals (as the FID/FAD reference code does), and an imaginary part is then dropped
    only if it is noise.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")

    def noisy(root: np.ndarray) -> bool:
        """Failed, or complex beyond rounding (rank-deficient covariances: fewer frames than dimensions)."""
        imaginary = np.iscomplexobj(root) and not np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3)
        return imaginary or not np.isfinite(root).all()

    covmean = linalg.sqrtm(s1 @ s2)
    if noisy(covmean):
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def stereo_frames(embedder: FrameEmbedder, item: AudioInput) -> np.ndarray:
    """One file -> (F, 2D): peak -1 dBFS, resampled, L and R embedded separately, frame rows concatenated [L | R]."""
    audio, sr = load_audio(item)
    audio = resample(to_stereo(peak_normalize(audio)), sr, embedder.sample_rate)
    left, right = embedder.embed_frames(audio[0]), embedder.embed_frames(audio[1])  # (F, D) each
    return np.concatenate([left, right], axis=1)


def pooled_frames(embedder: FrameEmbedder, items: Sequence[AudioInput]) -> np.ndarray:
    """Every frame of every file, stacked: (sum of F, 2D)."""
    if not items:
        raise ValueError("no audio to embed")
    return np.concatenate([stereo_frames(embedder, item) for item in items], axis=0)


def fd(embedder: FrameEmbedder, generated: Sequence[AudioInput], reference: Sequence[AudioInput]) -> float:
    """FD between two sets of files: Gaussians fitted to all their frames pooled (not per-file means)."""
    return frechet_distance(
        *gaussian_stats(pooled_frames(embedder, generated)), *gaussian_stats(pooled_frames(embedder, reference))
    )


# ---------------------------------------------------------------------------------------------------------------------
# KL


def kl_windows(
    audio: np.ndarray, sample_rate: int, window_seconds: float = KL_WINDOW_SECONDS, hop_seconds: float = KL_HOP_SECONDS
) -> np.ndarray:
    """Mono (N,) -> (W, L) windows of L = window_seconds samples, starting every hop_seconds.

    Starts are 0, hop, 2·hop, ... while start < N - hop (and at least one window), so the last window reaches the
    end and no window is mostly padding: 25 s -> starts 0, 5, 10, 15 (4 windows); 12 s -> 0, 5; 3 s -> 0. A window
    running past the end is zero-padded to L (only the last one, or a clip shorter than one window).
    """
    length, step = round(window_seconds * sample_rate), round(hop_seconds * sample_rate)
    starts = range(0, max(step, audio.shape[0] - step), step)
    windows = np.zeros((len(starts), length), dtype=np.float32)
    for row, start in enumerate(starts):
        chunk = audio[start : start + length]
        windows[row, : chunk.shape[0]] = chunk
    return windows


def class_probabilities(classifier: Classifier, item: AudioInput) -> np.ndarray:
    """One file -> (K,) probabilities: mono, resampled, peak -1 dBFS, logits averaged over windows, softmax."""
    audio, sr = load_audio(item)
    mono = peak_normalize(resample(to_mono(audio)[None], sr, classifier.sample_rate)[0])
    logits = np.asarray(classifier.logits(kl_windows(mono, classifier.sample_rate)), dtype=np.float64)  # (W, K)
    return softmax(logits.mean(axis=0))


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-6) -> float:
    """KL(p || q) = Σ p log(p / (q + eps)) in nats, with 0 log 0 = 0; eps keeps q = 0 finite (as the authors do)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(np.sum(xlogy(p, p) - xlogy(p, q + eps)))


KlDirection = Literal["reference||generated", "generated||reference"]


def kl(
    classifier: Classifier,
    generated: Mapping[str, AudioInput],
    reference: Mapping[str, AudioInput],
    direction: KlDirection = "reference||generated",
    eps: float = 1e-6,
) -> float:
    """Mean over caption ids of KL between the reference's and the generated file's class probabilities.

    Files are paired by id (the keys); ids found on one side only are skipped with a warning. ``direction``
    defaults to KL(reference || generated) (AudioCraft's KLD, the issue's definition); stable-audio-metrics'
    released code computes KL(generated || reference) instead, selectable here to reproduce its numbers.
    """
    ids = sorted(set(generated) & set(reference))
    unpaired = sorted(set(generated) ^ set(reference))
    if unpaired:
        log.warning("KL: %d ids without a partner are skipped: %s", len(unpaired), unpaired[:5])
    if direction not in ("reference||generated", "generated||reference"):
        raise ValueError(f"KL direction must be 'reference||generated' or 'generated||reference', got {direction!r}")
    if not ids:
        raise ValueError("KL: no caption id is present in both the generated and the reference set")
    total = 0.0
    for key in ids:
        p_ref, p_gen = class_probabilities(classifier, reference[key]), class_probabilities(classifier, generated[key])
        p, q = (p_ref, p_gen) if direction == "reference||generated" else (p_gen, p_ref)
        total += kl_divergence(p, q, eps)
    return total / len(ids)


# ---------------------------------------------------------------------------------------------------------------------
# CLAP score


def clap_score(embedder: TextAudioEmbedder, prompts: Sequence[str], audio: Sequence[AudioInput]) -> float:
    """Mean cosine similarity between each prompt's text embedding and the embedding of its audio (row i of each),
    resampled to the embedder's rate and peak-normalised to -1 dBFS."""
    return clap_scores(embedder, prompts, audio)[0]


def clap_scores(
    embedder: TextAudioEmbedder, prompts: Sequence[str], audio: Sequence[AudioInput]
) -> tuple[float, float | None]:
    """(matched, shuffled): the CLAP score of :func:`clap_score`, and the mean similarity of every prompt with every
    *other* file (None for a single file). Matched above shuffled is what says the audio follows its prompt."""
    if len(prompts) != len(audio) or not prompts:
        raise ValueError(f"need as many prompts as audio files (>= 1), got {len(prompts)} and {len(audio)}")
    text = np.asarray(embedder.embed_text(list(prompts)))  # (B, P)
    sound = []
    for item in audio:
        samples, sr = load_audio(item)
        sound.append(embedder.embed_audio(peak_normalize(resample(samples, sr, embedder.sample_rate))))
    return matched_and_shuffled(text, np.stack(sound))


def matched_and_shuffled(text: np.ndarray, audio: np.ndarray) -> tuple[float, float | None]:
    """Text (B, P) and audio (B, P) embeddings → (mean cosine of row i with row i, mean cosine over pairs i ≠ j)."""
    a = np.asarray(text, dtype=np.float64)
    b = np.asarray(audio, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    sims = a @ b.T  # (B, B)
    n = len(sims)
    matched = float(np.trace(sims) / n)
    shuffled = float((sims.sum() - np.trace(sims)) / (n * (n - 1))) if n > 1 else None
    return matched, shuffled


# ---------------------------------------------------------------------------------------------------------------------
# Timing accuracy (ours)


def timing_accuracy(
    outputs: Sequence[AudioInput], seconds_total: Sequence[float], tolerance_s: float = 1.0
) -> TimingAccuracy:
    """Non-silent length of each output vs its requested ``seconds_total``.

    Measure the model's raw output window (before any trim to the requested length): a trimmed file cannot show
    content that runs on too long.
    """
    if len(outputs) != len(seconds_total) or not outputs:
        raise ValueError(f"need one requested length per output (>= 1), got {len(seconds_total)} and {len(outputs)}")
    return timing_summary([nonsilent_seconds(*load_audio(item)) for item in outputs], seconds_total, tolerance_s)


# ---------------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class MetricsReport:
    """The metrics of one evaluation and the embedder behind each. None = not computed (see ``notes``)."""

    fd: float | None = None
    kl: float | None = None
    clap_score: float | None = None
    clap_score_shuffled: float | None = None  # the same embedder on mismatched prompt/audio pairs (a baseline)
    timing: TimingAccuracy | None = None
    embedders: dict[str, str] = field(default_factory=dict)  # metric ("fd", "kl", "clap_score") -> embedder name
    kl_direction: str = "reference||generated"
    counts: dict[str, int] = field(default_factory=dict)  # e.g. generated files, reference files, KL pairs
    notes: list[str] = field(default_factory=list)  # why a metric is missing, why a paper embedder was not used

    def is_paper(self, metric: str) -> bool:
        """True when ``metric`` was computed with the paper's embedder (comparable with the published table)."""
        return self.embedders.get(metric) == PAPER_EMBEDDERS.get(metric)

    def label(self, metric: str) -> str:
        """'FD_openl3' for the paper's embedder, else 'FD[<embedder>]', so no figure passes for the paper's."""
        if self.is_paper(metric):
            return PAPER_LABELS[metric]
        short = {"fd": "FD", "kl": "KL", "clap_score": "CLAP"}[metric]
        return f"{short}[{self.embedders.get(metric, 'none')}]"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["labels"] = {m: self.label(m) for m in ("fd", "kl", "clap_score")}
        out["paper_embedders"] = {m: self.is_paper(m) for m in ("fd", "kl", "clap_score")}
        return out

    def flat_metrics(self) -> dict[str, float]:
        """Numbers only, named "<metric>.<embedder>" (MLflow-safe names: no brackets), for log_metrics."""
        out = {f"{m}.{self.embedders.get(m, 'none')}": getattr(self, m) for m in ("fd", "kl", "clap_score")}
        out = {name: float(value) for name, value in out.items() if value is not None}
        if self.clap_score_shuffled is not None:
            out[f"clap_score_shuffled.{self.embedders.get('clap_score', 'none')}"] = self.clap_score_shuffled
        if self.timing is not None:
            out["timing.median_abs_error_s"] = self.timing.median_abs_error_s
            out["timing.within_tolerance"] = self.timing.within_tolerance
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=json_default)


def json_default(value: object) -> object:
    """``json.dumps(default=...)`` for numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def format_table(report: MetricsReport) -> str:
    """A fixed-width table: metric, value, embedder, and whether the figure is comparable with the paper's."""
    rows = [("metric", "value", "embedder", "paper's embedder")]
    for metric in ("fd", "kl", "clap_score"):
        value = getattr(report, metric)
        paper = "yes" if report.is_paper(metric) else "no"
        rows.append((report.label(metric), _fmt(value), report.embedders.get(metric, "-"), paper))
        if metric == "clap_score" and report.clap_score_shuffled is not None:
            label = report.label(metric) + " shuffled pairs"
            rows.append((label, _fmt(report.clap_score_shuffled), report.embedders.get(metric, "-"), paper))
    if report.timing is not None:
        t = report.timing
        rows.append(("timing median |error| (s)", _fmt(t.median_abs_error_s, 3), "-", "ours"))
        rows.append((f"timing within {t.tolerance_s:g} s", f"{t.within_tolerance:.0%} of {t.count}", "-", "ours"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.kl is not None:
        lines.append(f"KL direction: {report.kl_direction}")
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
