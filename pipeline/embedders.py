"""Embedders for `pipeline.metrics`: the paper's when their weights are on disk, documented fallbacks otherwise.

| metric | the paper's (used only if present locally)        | fallback here                                    |
| ------ | ------------------------------------------------- | ------------------------------------------------ |
| FD     | OpenL3 mel256 / music / 512-d, 1 s win, 0.5 s hop | LogMelFrames: log-mel statistics, same framing   |
| KL     | PaSST-S (AudioSet, 527 classes), 32 kHz           | ClapZeroShot over our CLAP, else MelBandClassifier |
| CLAP   | LAION-CLAP 630k-audioset-fusion, 48 kHz           | ProjectClap: our CLAP (VAE latents, audio tower) |

Nothing is downloaded: a paper embedder needs its Python package installed *and* its weights at the path given in
:class:`EmbedderPaths`; otherwise :func:`select_embedders` says why in a note and falls back. Each embedder's
``name`` is what the report prints, so a fallback figure is never labelled as the paper's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics
from pipeline.metrics import (
    PAPER_EMBEDDERS,
    AudioInput,
    Classifier,
    FrameEmbedder,
    MetricsReport,
    TextAudioEmbedder,
    to_mono,
    to_stereo,
)


@dataclass(frozen=True)
class EmbedderPaths:
    """Local weight files of the paper's embedders; None = not available (the fallback is used)."""

    openl3_weights: Path | None = None  # openl3_audio_mel256_music.h5 (needs the `openl3` package, TensorFlow)
    passt_weights: Path | None = None  # passt-s-f128-p16-s10-ap.476-swa.pt state dict (needs `hear21passt`)
    laion_clap_checkpoint: Path | None = None  # 630k-audioset-fusion-best.pt (needs `laion_clap` + roberta-base cached)


class EmbedderUnavailable(RuntimeError):
    """A paper embedder cannot be built here; the message says what is missing."""


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic log-mel features (no weights)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """HTK-scale triangular filters from 0 Hz to Nyquist, (n_mels, n_fft // 2 + 1), peak 1 each."""
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))  # (n_mels + 2,) Hz
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (n_fft // 2 + 1,) Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bins - lo) / (mid - lo), (hi - bins) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_windows(
    audio: np.ndarray, sample_rate: int, window_s: float, hop_s: float, n_mels: int = 64, n_fft: int = 2048
) -> np.ndarray:
    """Mono (N,) -> (F, n_mels, S) natural-log mel power of each analysis window, S STFT frames per window.

    Windows of ``window_s`` start every ``hop_s`` (the first at 0); audio shorter than one window is zero-padded
    to one. Inside a window: Hann STFT with n_fft samples and hop n_fft / 2, no centring.
    """
    win, hop = round(window_s * sample_rate), round(hop_s * sample_rate)
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    if x.shape[0] < win:
        x = torch.nn.functional.pad(x, (0, win - x.shape[0]))
    frames = x.unfold(0, win, hop)  # (F, win)
    spec = torch.stft(
        frames, n_fft, n_fft // 2, window=torch.hann_window(n_fft), center=False, return_complex=True
    )  # (F, n_fft // 2 + 1, S)
    mel = torch.from_numpy(mel_filterbank(sample_rate, n_fft, n_mels)) @ spec.abs().square()  # (F, n_mels, S)
    return torch.log(mel + 1e-10).numpy()


@dataclass
class LogMelFrames:
    """FD fallback: per 1 s window (0.5 s hop, OpenL3's framing), mean and std over time of 64 log-mel bands.

    Deterministic and weight-free, 128-d per channel. It measures spectral-envelope statistics, not OpenL3's learned
    semantics, so its FD values are on another scale from FD_openl3 and must not be compared with the paper.
    """

    sample_rate: int = 44100
    window_s: float = 1.0
    hop_s: float = 0.5
    n_mels: int = 64
    name: str = "logmel64-meanstd-1s-hop0.5s"

    def embed_frames(self, audio: np.ndarray) -> np.ndarray:
        logmel = log_mel_windows(audio, self.sample_rate, self.window_s, self.hop_s, self.n_mels)  # (F, M, S)
        return np.concatenate([logmel.mean(axis=2), logmel.std(axis=2)], axis=1)  # (F, 2M)


@dataclass
class MelBandClassifier:
    """KL fallback without any model: "logits" are the window's mean log mel power per band (64 "classes").

    softmax then gives the window's normalised mel power distribution, so KL compares spectral balance, not AudioSet
    classes. Documented stand-in only.
    """

    sample_rate: int = 44100
    n_mels: int = 64
    name: str = "melband64-energy"

    def logits(self, windows: np.ndarray) -> np.ndarray:
        rows = [
            log_mel_windows(w, self.sample_rate, w.shape[0] / self.sample_rate, 1.0, self.n_mels)[0] for w in windows
        ]
        return np.stack([r.mean(axis=1) for r in rows])  # (W, n_mels)


# ---------------------------------------------------------------------------------------------------------------------
# The project's own CLAP (audio tower over VAE latents)


DEFAULT_LABELS: tuple[str, ...] = (
    "piano", "harpsichord", "organ", "guitar", "violin", "cello", "strings", "choir", "trumpet", "horn", "flute",
    "oboe", "clarinet", "harp", "marimba", "major key", "minor key", "slow tempo", "fast tempo",
)  # fmt: skip


@dataclass
class ProjectClap:
    """CLAP score fallback: our CLAP. Audio (C, N) at the VAE's rate -> stereo -> VAE latents -> audio tower.

    ``autoencoder`` is a `pipeline.models.Autoencoder`, ``clap`` a `pipeline.models.clap.CLAP`, ``tokenizer`` a
    `pipeline.text.CaptionTokenizer` (the one the CLAP was trained with). ``name`` should identify the checkpoint.
    """

    autoencoder: Any
    clap: Any
    tokenizer: Any
    name: str = "longplay-clap"
    device: str = "cpu"
    sample_rate: int = field(init=False)

    def __post_init__(self) -> None:
        self.sample_rate = int(self.autoencoder.sample_rate)
        self.autoencoder.eval().to(self.device)
        self.clap.eval().to(self.device)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenizer.encode_batch(list(texts), self.clap.config.text.max_tokens)
        emb = self.clap.encode_text(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
        return emb.float().cpu().numpy()  # (B, P)

    @torch.no_grad()
    def embed_audio_batch(self, audio: np.ndarray) -> np.ndarray:
        """(B, C, N) at ``sample_rate`` -> (B, P)."""
        x = torch.from_numpy(np.stack([to_stereo(a) for a in audio])).float().to(self.device)  # (B, 2, N)
        latents = self.autoencoder.encode_chunked(x)  # (B, C_lat, T)
        return self.clap.encode_audio(latents).float().cpu().numpy()

    def embed_audio(self, audio: np.ndarray) -> np.ndarray:
        return self.embed_audio_batch(audio[None])[0]


@dataclass
class ClapZeroShot:
    """KL fallback with a trained CLAP: logits = CLAP's inverse temperature x cos(window, label prompt).

    A zero-shot classifier over a fixed label set (instrument, mode, tempo words of the demo captions), the
    closest stand-in for an audio tagger that this project can train itself.
    """

    clap: ProjectClap
    labels: tuple[str, ...] = DEFAULT_LABELS
    name: str = field(init=False)
    sample_rate: int = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.clap.name}-zeroshot{len(self.labels)}"
        self.sample_rate = self.clap.sample_rate
        self._label_emb = self.clap.embed_text(self.labels)  # (K, P)
        self._scale = float(self.clap.clap.temperature_inverse.detach())

    def logits(self, windows: np.ndarray) -> np.ndarray:
        audio = self.clap.embed_audio_batch(np.asarray(windows)[:, None, :])  # (W, P) unit vectors
        return self._scale * audio @ self._label_emb.T  # (W, K)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's embedders (only from local weights; not exercised by the test suite: the packages are not installed)


def _need_package(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise EmbedderUnavailable(f"package {pip_name!r} is not installed")


def _need_file(path: Path | None, what: str) -> Path:
    if path is None or not Path(path).is_file():
        raise EmbedderUnavailable(f"{what} weights not found locally ({path or 'no path configured'})")
    return Path(path)


class OpenL3Frames:
    """OpenL3 (Cramer et al. 2019), mel256 / music / 512-d, 1 s windows at 0.5 s hop, 48 kHz network input.

    Audio is handed over at 44.1 kHz (the paper's evaluation rate); openl3 resamples internally.
    """

    name = PAPER_EMBEDDERS["fd"]
    sample_rate = 44100

    def __init__(self, weights: Path | None) -> None:
        _need_package("openl3", "openl3")
        path = _need_file(weights, "OpenL3 mel256 music")
        import openl3

        self._openl3 = openl3
        self._model = openl3.models.load_audio_embedding_model(
            input_repr="mel256", content_type="music", embedding_size=512
        )
        self._model.load_weights(str(path))

    def embed_frames(self, audio: np.ndarray) -> np.ndarray:
        emb, _ = self._openl3.get_audio_embedding(
            audio, self.sample_rate, model=self._model, hop_size=0.5, center=True, verbose=False
        )
        return np.asarray(emb)  # (F, 512)


class PasstClassifier:
    """PaSST-S (Koutini et al. 2022) trained on AudioSet: 527 logits per 10 s window of 32 kHz mono."""

    name = PAPER_EMBEDDERS["kl"]
    sample_rate = 32000

    def __init__(self, weights: Path | None) -> None:
        _need_package("hear21passt", "hear21passt")
        path = _need_file(weights, "PaSST-S AudioSet")
        from hear21passt.models.passt import get_model
        from hear21passt.models.preprocess import AugmentMelSTFT
        from hear21passt.wrapper import PasstBasicWrapper

        # hear21passt's own mel front end settings for this checkpoint; pretrained=False: nothing is fetched.
        mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192)
        net = get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self._model = PasstBasicWrapper(mel=mel, net=net, mode="logits").eval()

    @torch.no_grad()
    def logits(self, windows: np.ndarray) -> np.ndarray:
        return self._model(torch.from_numpy(np.asarray(windows, dtype=np.float32))).float().numpy()  # (W, 527)


class LaionClap:
    """LAION-CLAP 630k-audioset-fusion (Wu et al. 2023): 48 kHz mono, int16-quantised as its authors feed it."""

    name = PAPER_EMBEDDERS["clap_score"]
    sample_rate = 48000

    def __init__(self, checkpoint: Path | None) -> None:
        _need_package("laion_clap", "laion-clap")
        path = _need_file(checkpoint, "LAION-CLAP 630k-audioset-fusion")
        import laion_clap

        self._model = laion_clap.CLAP_Module(enable_fusion=True, device="cpu")  # needs roberta-base in the HF cache
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
        state.pop("text_branch.embeddings.position_ids", None)
        self._model.model.load_state_dict(state)
        self._model.eval()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self._model.get_text_embedding(list(texts), use_tensor=True).float().numpy()

    @torch.no_grad()
    def embed_audio(self, audio: np.ndarray) -> np.ndarray:
        mono = np.round(np.clip(to_mono(audio), -1.0, 1.0) * 32767.0) / 32767.0
        x = torch.from_numpy(mono.astype(np.float32))[None]  # (1, N)
        return self._model.get_audio_embedding_from_data(x=x, use_tensor=True)[0].float().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Selection


@dataclass
class Embedders:
    frame: FrameEmbedder
    classifier: Classifier
    text_audio: TextAudioEmbedder | None  # None: no CLAP at all, the CLAP score is not computed
    notes: list[str] = field(default_factory=list)  # why each paper embedder was or was not used

    @property
    def names(self) -> dict[str, str]:
        out = {"fd": self.frame.name, "kl": self.classifier.name}
        if self.text_audio is not None:
            out["clap_score"] = self.text_audio.name
        return out


def select_embedders(paths: EmbedderPaths, project_clap: ProjectClap | None = None) -> Embedders:
    """The paper's embedders where present locally, else the fallbacks; ``notes`` say which and why."""
    notes: list[str] = []

    def attempt(label: str, build):
        try:
            return build()
        except EmbedderUnavailable as err:
            notes.append(f"{label}: paper embedder not used ({err}); using the fallback")
            return None

    frame = attempt("FD", lambda: OpenL3Frames(paths.openl3_weights)) or LogMelFrames()
    classifier = attempt("KL", lambda: PasstClassifier(paths.passt_weights))
    if classifier is None:
        classifier = ClapZeroShot(project_clap) if project_clap is not None else MelBandClassifier()
    text_audio = attempt("CLAP", lambda: LaionClap(paths.laion_clap_checkpoint)) or project_clap
    if text_audio is None:
        notes.append("CLAP score: no CLAP model given; not computed")
    return Embedders(frame, classifier, text_audio, notes)


# ---------------------------------------------------------------------------------------------------------------------
# One evaluation


def evaluate(
    embedders: Embedders,
    generated: Mapping[str, AudioInput],
    prompts: Mapping[str, str],
    seconds_total: Mapping[str, float] | None = None,
    reference: Mapping[str, AudioInput] | None = None,
    kl_direction: metrics.KlDirection = "reference||generated",
) -> MetricsReport:
    """All metrics for generated files keyed by caption id.

    FD compares the generated set with the whole reference set (unpaired); KL pairs generated and reference files
    by id; the CLAP score pairs each generated file with its prompt; timing compares each file's non-silent length
    with its requested ``seconds_total`` (pass the untrimmed outputs). Without ``reference`` FD and KL are skipped.
    """
    ids = sorted(generated)
    report = MetricsReport(embedders=embedders.names, kl_direction=kl_direction, notes=list(embedders.notes))
    report.counts = {"generated": len(ids), "reference": len(reference or {})}
    if reference:
        try:
            report.fd = metrics.fd(
                embedders.frame, [generated[i] for i in ids], [reference[i] for i in sorted(reference)]
            )
        except ValueError as exc:  # too few frames for a covariance, or a root that stays complex
            report.notes.append(f"FD: not computed ({exc})")
        report.counts["kl_pairs"] = len(set(generated) & set(reference))
        if report.counts["kl_pairs"]:
            report.kl = metrics.kl(embedders.classifier, generated, reference, direction=kl_direction)
        else:
            report.notes.append("KL: no generated id matches a reference id (KL pairs files by id); not computed")
    else:
        report.notes.append("FD and KL: no reference set given; not computed")
    if embedders.text_audio is not None:
        report.clap_score, report.clap_score_shuffled = metrics.clap_scores(
            embedders.text_audio, [prompts[i] for i in ids], [generated[i] for i in ids]
        )
    if seconds_total is not None:
        report.timing = metrics.timing_accuracy([generated[i] for i in ids], [seconds_total[i] for i in ids])
    return report
