"""Decoding every format/rate/layout to 44.1 kHz stereo, segmenting, and naming what is wrong with bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from preprocess_fixtures import write_mixed_inputs

from pipeline.config import PreprocessConfig
from preprocess import audio
from preprocess.encode import resolve_vae
from preprocess.job import fingerprint
from preprocess.sources import InputItem
from preprocess.worker import load_input


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    good, bad = write_mixed_inputs(root)
    return root, good, bad


def test_every_good_input_decodes_to_44k_stereo_of_the_right_length(mixed):
    root, good, _ = mixed
    for name, exp in good.items():
        decoded = audio.decode(str(root / name))
        assert decoded.audio.dtype == np.float32 and decoded.audio.shape == (2, exp.samples_44k), name
        assert decoded.seconds_total == exp.seconds_total, name
        assert np.isfinite(decoded.audio).all() and np.abs(decoded.audio).max() > 1e-4, name


def test_bad_inputs_are_rejected_with_their_reason(mixed):
    root, _, bad = mixed
    for name, category in bad.items():
        with pytest.raises(audio.AudioError) as err:
            audio.decode(str(root / name))
        assert err.value.reason.split(":")[0] == category, (name, err.value.reason)
        assert str(root) not in err.value.reason  # no local (temp) paths in errors.jsonl


def test_resampling_keeps_a_tone_at_its_frequency(tmp_path):
    rate, freq = 8000, 440.0
    t = np.arange(rate * 2) / rate
    path = tmp_path / "tone.wav"
    sf.write(path, np.sin(2 * np.pi * freq * t).astype(np.float32) * 0.5, rate)
    decoded = audio.decode(str(path))
    spectrum = np.abs(np.fft.rfft(decoded.audio[0]))
    peak = np.argmax(spectrum) * audio.SAMPLE_RATE / decoded.audio.shape[1]
    assert abs(peak - freq) < 1.0
    np.testing.assert_array_equal(decoded.audio[0], decoded.audio[1])  # mono → both sides


def test_stereo_matrix_layouts():
    assert np.allclose(np.array([[0.3]]) @ audio.stereo_matrix(1), [[0.3, 0.3]])
    assert np.allclose(audio.stereo_matrix(2), np.eye(2))
    five_one = audio.stereo_matrix(6)
    assert five_one.shape == (6, 2) and np.allclose(five_one.sum(axis=0), 1.0)
    assert five_one[3].tolist() == [0.0, 0.0]  # LFE dropped
    assert five_one[0, 0] > five_one[2, 0] > 0 and five_one[0, 1] == 0  # FL → left only, centre to both
    assert np.allclose(audio.stereo_matrix(4), 0.25)


def test_segments_keep_offsets_and_cover_the_input():
    x = np.zeros((2, 44100 * 10 + 7), np.float32)
    segs = audio.segments(x, max_seconds=4.0)
    assert [s.offset_seconds for s in segs] == [0.0, 4.0, 8.0]
    assert [s.audio.shape[1] for s in segs] == [176400, 176400, 88207]
    assert [s.index for s in segs] == [0, 1, 2]


def test_flac_bytes_round_trip():
    x = (np.random.default_rng(0).standard_normal((2, 4410)) * 0.1).astype(np.float32)
    data, rate = sf.read(io.BytesIO(audio.flac_bytes(x)), dtype="float32")
    assert rate == 44100 and data.shape == (4410, 2)
    np.testing.assert_allclose(data.T, x, atol=1e-6)


# ----------------------------------------------------------------------------------------------- hostile headers
def _wav(path, frames: int, rate: int, channels: int = 2) -> str:
    sf.write(path, np.full((frames, channels), 0.1, np.float32), rate, subtype="PCM_16")
    return str(path)


@pytest.mark.parametrize(
    ("rate", "channels", "detail"),
    [(1, 2, "1 Hz"), (2**31 - 1, 2, "2147483647 Hz"), (8000, 300, "300 channels")],
)
def test_a_header_declaring_an_absurd_rate_or_layout_is_refused(tmp_path, rate, channels, detail):
    # 100 frames at 1 Hz would decode to 4.4 M samples (the 2 MB file of issue 15: hundreds of GB); the others
    # decode to 0 samples, or read 300 channels per block
    path = _wav(tmp_path / "liar.wav", 100, rate, channels)
    with pytest.raises(audio.AudioError) as err:
        audio.decode(path)
    assert err.value.reason.startswith("bad-header:") and detail in err.value.reason


def test_an_input_longer_than_max_input_seconds_is_refused(tmp_path, monkeypatch):
    path = _wav(tmp_path / "long.wav", 3 * 8000, 8000)
    assert audio.decode(path, max_input_seconds=3.0).audio.shape == (2, 3 * 44100)
    with pytest.raises(audio.AudioError, match=r"^too-long: header declares 3 s"):
        audio.decode(path, max_input_seconds=2.0)
    # a header that under-declares is still stopped by the frames read, one block past the bound at most
    monkeypatch.setattr(audio, "_check_header", lambda *args: None)
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1000)
    with pytest.raises(audio.AudioError, match=r"^too-long: more than max_input_seconds \(2 s\)"):
        audio.decode(path, max_input_seconds=2.0)
    assert audio.MAX_INPUT_SECONDS == PreprocessConfig().max_input_seconds == 7200.0


def test_the_job_takes_max_input_seconds_from_its_config(tmp_path):
    """preprocess.max_input_seconds reaches the decode of every input; the bound is part of the plan fingerprint."""
    path = _wav(tmp_path / "long.wav", 3 * 8000, 8000)
    item = InputItem(uri=path, key="long")
    assert load_input(item, 4.0).error is None
    assert load_input(item, 2.0).error.startswith("too-long: header declares 3 s, max_input_seconds is 2")
    plans = [fingerprint([item], PreprocessConfig(max_input_seconds=s), resolve_vae("none")) for s in (2.0, 4.0)]
    assert plans[0]["max_input_seconds"] == 2.0 and plans[0] != plans[1]


def test_an_input_of_zero_samples_at_44k_is_an_empty_error(tmp_path):
    path = _wav(tmp_path / "one_frame.wav", 1, 96000)  # round(1 · 44100 / 96000) = 0 samples: no segment
    with pytest.raises(audio.AudioError, match=r"^empty: 1 frames at 96000 Hz are 0 samples"):
        audio.decode(path)
    assert audio.decode(_wav(tmp_path / "two_frames.wav", 2, 96000)).audio.shape == (2, 1)


def test_a_resampler_refusal_is_a_decode_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("soxr: unsupported ratio")

    monkeypatch.setattr(audio.soxr, "ResampleStream", refuse)
    with pytest.raises(audio.AudioError, match=r"^decode: ValueError: soxr: unsupported ratio"):
        audio.decode(_wav(tmp_path / "x.wav", 100, 48000))
