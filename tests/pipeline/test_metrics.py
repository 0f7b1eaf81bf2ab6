"""The paper's metrics (pipeline.metrics): FD, KL, CLAP score, timing accuracy, checked against hand computations."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.embedders import (
    ClapZeroShot,
    EmbedderPaths,
    LogMelFrames,
    MelBandClassifier,
    ProjectClap,
    select_embedders,
)
from pipeline.metrics import (
    MetricsReport,
    clap_score,
    class_probabilities,
    fd,
    format_table,
    frechet_distance,
    gaussian_stats,
    kl,
    kl_divergence,
    kl_windows,
    nonsilent_seconds,
    peak_normalize,
    pooled_frames,
    timing_accuracy,
)

SR = 44100
PEAK = 10 ** (-1 / 20)  # -1 dBFS


def tone(seconds: float, freq: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Peak normalisation and framing


def test_peak_normalize_to_minus_1_dbfs(tmp_path) -> None:
    audio = np.stack([tone(1.0, 440, amp=0.1), tone(1.0, 220, amp=0.25)])  # (2, N), peak 0.25 on the right
    out = peak_normalize(audio)
    assert out.shape == audio.shape
    assert np.max(np.abs(out)) == pytest.approx(PEAK, rel=1e-6)
    assert 20 * np.log10(np.max(np.abs(out))) == pytest.approx(-1.0, abs=1e-5)
    np.testing.assert_allclose(out[0] / out[1].max(), audio[0] / audio[1].max(), rtol=1e-5)  # one gain for both
    silent = np.zeros((2, 100), np.float32)
    assert np.array_equal(peak_normalize(silent), silent)


def test_kl_windows_10s_with_5s_hop() -> None:
    sr = 100
    assert kl_windows(np.ones(25 * sr), sr).shape == (4, 10 * sr)  # starts 0, 5, 10, 15 s
    twelve = kl_windows(np.arange(12 * sr, dtype=np.float32), sr)
    assert twelve.shape == (2, 10 * sr)  # starts 0, 5 s; the second is 7 s of audio then zeros
    assert twelve[1, 0] == 5 * sr and twelve[1, 7 * sr - 1] == 12 * sr - 1 and not twelve[1, 7 * sr :].any()
    assert kl_windows(np.ones(3 * sr), sr).shape == (1, 10 * sr)
    assert kl_windows(np.ones(10 * sr), sr).shape == (1, 10 * sr)
    assert kl_windows(np.ones(20 * sr), sr).shape == (3, 10 * sr)


# ---------------------------------------------------------------------------------------------------------------------
# FD


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    mu, sigma = gaussian_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # Diagonal covariances: FD = |mu1 - mu2|² + Σ (σ1 - σ2)².
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    s1, s2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(9 + 4 + (2 - 1) ** 2 + (1 - 3) ** 2)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu1, s1, np.zeros(3), np.eye(3))


class SampleFrames:
    """Fake FrameEmbedder: every sample of the channel is one 1-d frame, so the stereo frame is (L_i, R_i)."""

    name = "fake-samples"
    sample_rate = 8

    def embed_frames(self, audio: np.ndarray) -> np.ndarray:
        return np.asarray(audio, dtype=np.float64)[:, None]


def _tr_sqrt_2x2(p: np.ndarray) -> float:
    # The eigenvalues l1, l2 of s1 s2 are real and >= 0, and Tr sqrt = √l1 + √l2 = sqrt(tr + 2 sqrt(det)).
    return math.sqrt(p[0, 0] + p[1, 1] + 2 * math.sqrt(p[0, 0] * p[1, 1] - p[0, 1] * p[1, 0]))


def _stats_by_hand(rows: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    n = len(rows)
    mx, my = sum(r[0] for r in rows) / n, sum(r[1] for r in rows) / n
    sxx = sum((r[0] - mx) ** 2 for r in rows) / (n - 1)
    syy = sum((r[1] - my) ** 2 for r in rows) / (n - 1)
    sxy = sum((r[0] - mx) * (r[1] - my) for r in rows) / (n - 1)
    return np.array([mx, my]), np.array([[sxx, sxy], [sxy, syy]])


def test_fd_matches_hand_computation_on_fake_embedder() -> None:
    # Files already at -1 dBFS (peak PEAK), so peak normalisation leaves them as they are.
    gen = [
        np.array([[PEAK, 0.2, -0.3, 0.1], [0.5, 0.1, -0.2, 0.4]]),
        np.array([[0.3, -0.1, 0.6], [-PEAK, 0.0, 0.2]]),
    ]
    ref = [np.array([[0.1, 0.4, -0.5, PEAK, 0.0], [0.3, 0.6, 0.1, -0.4, 0.2]]), np.array([[0.2, PEAK], [0.1, -0.7]])]
    got = fd(SampleFrames(), [(g, 8) for g in gen], [(r, 8) for r in ref])

    gen_rows = [(l, r) for g in gen for l, r in zip(g[0], g[1], strict=True)]  # every frame of every file pooled
    ref_rows = [(l, r) for g in ref for l, r in zip(g[0], g[1], strict=True)]
    (mu1, s1), (mu2, s2) = _stats_by_hand(gen_rows), _stats_by_hand(ref_rows)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _tr_sqrt_2x2(s1 @ s2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise() -> None:
    rng = np.random.default_rng(1)
    embedder = LogMelFrames(n_mels=8)  # 16-d per channel, 32-d per stereo frame; 8 files x 5 frames = 40 frames
    files = []
    for i in range(8):
        left, right = tone(3.0, 110 * (i + 2)), tone(3.0, 165 * (i + 1), amp=0.3)
        files.append((np.stack([left, right]) + 0.001 * rng.normal(size=(2, 3 * SR)).astype(np.float32), SR))
    assert fd(embedder, files, files) == pytest.approx(0.0, abs=1e-6)
    reference = gaussian_stats(pooled_frames(embedder, files))
    values = []
    for level in (0.003, 0.03, 0.3):
        noisy = [(a + level * rng.normal(size=a.shape).astype(np.float32), sr) for a, sr in files]
        values.append(frechet_distance(*gaussian_stats(pooled_frames(embedder, noisy)), *reference))
    assert 0 < values[0] < values[1] < values[2], values


# ---------------------------------------------------------------------------------------------------------------------
# KL


def test_kl_divergence_by_hand() -> None:
    p, q = np.array([0.1, 0.4, 0.5]), np.array([0.8, 0.15, 0.05])
    expected = 0.1 * math.log(0.1 / 0.8) + 0.4 * math.log(0.4 / 0.15) + 0.5 * math.log(0.5 / 0.05)
    assert kl_divergence(p, q, eps=0.0) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(p, q) == pytest.approx(expected, abs=1e-4)  # eps = 1e-6 barely moves it
    assert kl_divergence(p, p, eps=0.0) == 0.0
    assert kl_divergence(np.array([0.0, 1.0]), np.array([0.5, 0.5]), eps=0.0) == pytest.approx(math.log(2))


class MeanClassifier:
    """Fake Classifier: window w -> logits (m, -m, 0) with m = mean(w)."""

    name = "fake-mean"
    sample_rate = 10

    def logits(self, windows: np.ndarray) -> np.ndarray:
        m = windows.mean(axis=1)
        return np.stack([m, -m, np.zeros_like(m)], axis=1)


def _clip(values: list[float]) -> tuple[np.ndarray, int]:
    """25 s at 10 Hz, stereo L = R, five 5 s segments of the given values (the first is the -1 dBFS peak)."""
    mono = np.repeat(np.array(values, np.float32), 50)
    return np.stack([mono, mono]), 10


def _probs_by_hand(values: list[float]) -> np.ndarray:
    g, a, b, c, d = values  # windows 0-10, 5-15, 10-20, 15-25 s; each window's mean is the mean of 2 segments
    m = ((g + a) / 2 + (a + b) / 2 + (b + c) / 2 + (c + d) / 2) / 4
    e = np.exp([m, -m, 0.0])
    return e / e.sum()


def test_kl_matches_hand_computation_on_fake_classifier() -> None:
    gen = {"x": [PEAK, 0.1, 0.2, 0.3, 0.0], "y": [PEAK, -0.5, -0.2, 0.1, 0.6]}
    ref = {"x": [PEAK, 0.7, 0.5, 0.8, 0.4], "y": [PEAK, 0.0, 0.0, 0.0, 0.0], "only-ref": [PEAK, 0, 0, 0, 0]}
    clf = MeanClassifier()
    np.testing.assert_allclose(class_probabilities(clf, _clip(gen["x"])), _probs_by_hand(gen["x"]), rtol=1e-6)

    def by_hand(direction: str) -> float:
        total = 0.0
        for key in ("x", "y"):
            p, q = _probs_by_hand(ref[key]), _probs_by_hand(gen[key])
            if direction == "generated||reference":
                p, q = q, p
            total += sum(pi * math.log(pi / (qi + 1e-6)) for pi, qi in zip(p, q, strict=True))
        return total / 2

    gen_clips = {k: _clip(v) for k, v in gen.items()}
    ref_clips = {k: _clip(v) for k, v in ref.items()}
    assert kl(clf, gen_clips, ref_clips) == pytest.approx(by_hand("reference||generated"), rel=1e-6)
    assert kl(clf, gen_clips, ref_clips, direction="generated||reference") == pytest.approx(
        by_hand("generated||reference"), rel=1e-6
    )
    assert kl(clf, gen_clips, gen_clips) == pytest.approx(0.0, abs=1e-5)  # identical logits (eps only)
    with pytest.raises(ValueError, match="no caption id"):
        kl(clf, {"a": gen_clips["x"]}, {"b": gen_clips["x"]})


def test_kl_of_identical_files_is_zero_with_fallback_classifier() -> None:
    clips = {"a": (np.stack([tone(12.0, 440)] * 2), SR), "b": (np.stack([tone(3.0, 880)] * 2), SR)}
    assert kl(MelBandClassifier(), clips, clips, eps=0.0) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# CLAP score


class BandEmbedder:
    """A 'trained' fake CLAP: text 'low'/'high' -> axis 0/1; audio -> its energy below/above 1 kHz."""

    name = "fake-band-clap"
    sample_rate = 8000

    def embed_text(self, texts):
        return np.array([[1.0, 0.0] if "low" in t else [0.0, 1.0] for t in texts])

    def embed_audio(self, audio):
        spec = np.abs(np.fft.rfft(audio.mean(axis=0))) ** 2
        freqs = np.fft.rfftfreq(audio.shape[-1], 1 / self.sample_rate)
        return np.array([spec[freqs < 1000].sum(), spec[freqs >= 1000].sum()])


def test_clap_score_matching_beats_shuffled() -> None:
    prompts = ["a low hum", "a high whistle", "low drone", "high beep"]
    audio = [(tone(1.0, f, SR)[None], SR) for f in (200, 3000, 150, 2500)]
    matching = clap_score(BandEmbedder(), prompts, audio)
    shuffled = clap_score(BandEmbedder(), prompts, [audio[i] for i in (1, 0, 3, 2)])
    assert matching > 0.95 and shuffled < 0.1 and matching > shuffled
    with pytest.raises(ValueError, match="as many prompts"):
        clap_score(BandEmbedder(), prompts, audio[:2])


def test_project_clap_embedder_runs_on_tiny_models() -> None:
    from pipeline.models.autoencoder import build_autoencoder
    from pipeline.models.clap import build_clap
    from pipeline.text import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["piano in C major", "organ in A minor", "slow tempo", "fast tempo"] * 4, 300, 1)
    project = ProjectClap(build_autoencoder("tiny"), build_clap("tiny", tokenizer.vocab_size), tokenizer, "tiny-test")
    assert project.embed_text(["piano"]).shape == (1, 64)
    assert project.embed_audio(tone(0.5, 440)[None]).shape == (64,)
    zero_shot = ClapZeroShot(project, labels=("piano", "organ", "fast tempo"))
    assert zero_shot.logits(np.stack([tone(0.5, 440), tone(0.5, 220)])).shape == (2, 3)
    chosen = select_embedders(EmbedderPaths(), project_clap=project)
    assert chosen.names == {"fd": LogMelFrames().name, "kl": ClapZeroShot(project).name, "clap_score": "tiny-test"}
    assert any("KL" in n and "not used" in n for n in chosen.notes)


def test_select_embedders_without_anything_says_so() -> None:
    chosen = select_embedders(EmbedderPaths())
    assert isinstance(chosen.frame, LogMelFrames) and isinstance(chosen.classifier, MelBandClassifier)
    assert chosen.text_audio is None
    assert len(chosen.notes) == 4 and all("not" in n for n in chosen.notes)


# ---------------------------------------------------------------------------------------------------------------------
# Timing accuracy


def test_nonsilent_length_of_tone_then_silence(tmp_path) -> None:
    audio = np.concatenate([tone(3.0, 440), np.zeros(2 * SR, np.float32)])
    path = tmp_path / "a.wav"
    sf.write(path, np.stack([audio, audio]).T, SR)
    assert nonsilent_seconds(np.stack([audio, audio]), SR) == pytest.approx(3.0, abs=0.1)
    quiet = np.concatenate([tone(3.0, 440), tone(2.0, 440, amp=0.5 * 10 ** (-50 / 20))])  # -50 dB: silence
    loud = np.concatenate([tone(3.0, 440), tone(2.0, 440, amp=0.5 * 10 ** (-30 / 20))])  # -30 dB: sound
    assert nonsilent_seconds(quiet[None], SR) == pytest.approx(3.0, abs=0.1)
    assert nonsilent_seconds(loud[None], SR) == pytest.approx(5.0, abs=1e-9)
    assert nonsilent_seconds(np.zeros((2, SR)), SR) == 0.0

    two = np.concatenate([tone(2.0, 440), np.zeros(3 * SR, np.float32)])
    result = timing_accuracy([path, (loud[None], SR), (two[None], SR)], [3.0, 5.0, 4.0])
    assert [r["nonsilent_s"] for r in result.per_file] == pytest.approx([3.0, 5.0, 2.0], abs=0.1)
    assert result.median_abs_error_s == pytest.approx(0.0, abs=0.1)
    assert result.within_tolerance == pytest.approx(2 / 3)
    assert result.count == 3


# ---------------------------------------------------------------------------------------------------------------------
# Report


def test_report_names_embedders_and_marks_paper_figures() -> None:
    report = MetricsReport(
        fd=1.5,
        kl=0.25,
        clap_score=None,
        embedders={"fd": "openl3-mel256-512-music", "kl": "melband64-energy"},
        notes=["CLAP score: no CLAP model given; not computed"],
    )
    data = json.loads(report.to_json())
    assert data["labels"] == {"fd": "FD_openl3", "kl": "KL[melband64-energy]", "clap_score": "CLAP[none]"}
    assert data["paper_embedders"] == {"fd": True, "kl": False, "clap_score": False}
    table = format_table(report)
    assert "FD_openl3" in table and "KL[melband64-energy]" in table and "n/a" in table and "note: CLAP" in table


def test_evaluate_fills_the_report_and_names_every_embedder() -> None:
    from pipeline.embedders import Embedders, evaluate

    rng = np.random.default_rng(2)
    gen = {
        f"id{i}": (np.stack([tone(3.0, 200 * (i + 1))] * 2) + 0.01 * rng.normal(size=(2, 3 * SR)), SR) for i in range(4)
    }
    ref = {f"id{i}": (np.stack([tone(3.0, 210 * (i + 1))] * 2), SR) for i in range(4)}
    prompts = {k: "low" if i < 2 else "high" for i, k in enumerate(gen)}
    chosen = Embedders(LogMelFrames(n_mels=8), MelBandClassifier(), BandEmbedder(), notes=["a note"])
    report = evaluate(chosen, gen, prompts, seconds_total={k: 3.0 for k in gen}, reference=ref)
    assert report.fd > 0 and report.kl > 0 and -1 <= report.clap_score <= 1
    assert report.timing.count == 4 and report.timing.within_tolerance == 1.0
    assert report.counts == {"generated": 4, "reference": 4, "kl_pairs": 4}
    assert report.embedders == {"fd": LogMelFrames().name, "kl": "melband64-energy", "clap_score": "fake-band-clap"}
    assert json.loads(report.to_json())["labels"]["fd"] == f"FD[{LogMelFrames().name}]"
    assert "a note" in format_table(report)
    flat = report.flat_metrics()
    assert flat["fd." + LogMelFrames().name] == report.fd and flat["timing.within_tolerance"] == 1.0
    assert all(re.fullmatch(r"[\w.\- /:]+", name) for name in flat)  # MLflow's allowed metric-name characters
    no_ref = evaluate(chosen, gen, prompts)
    assert no_ref.fd is None and no_ref.kl is None and no_ref.timing is None and no_ref.clap_score is not None
