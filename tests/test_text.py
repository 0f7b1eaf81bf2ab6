"""The caption tokenizer: RoBERTa framing, padding/truncation, exact round trips, deterministic JSON."""

import itertools

import numpy as np
import pytest

from pipeline.text import SPECIAL_TOKENS, CaptionTokenizer, train_tokenizer

INSTRUMENTS = ["piano", "violin", "cello", "flute", "string quartet", "harpsichord", "organ", "choir"]
KEYS = ["C major", "A minor", "G major", "E minor", "D major", "B flat major"]
TEMPOS = [60, 72, 90, 108, 120, 144]
TEMPLATES = ["{i} in {k} at {t} bpm", "A {t} bpm piece for {i} in {k}", "Solo {i}, {k}, {t} BPM"]


@pytest.fixture(scope="module")
def captions() -> list[str]:
    """A few hundred captions from attribute words."""
    return sorted(
        {
            template.format(i=i, k=k, t=t)
            for template, i, k, t in itertools.product(TEMPLATES, INSTRUMENTS, KEYS, TEMPOS)
        }
    )


@pytest.fixture(scope="module")
def tokenizer(captions: list[str]) -> CaptionTokenizer:
    return train_tokenizer(captions, vocab_size=600, min_frequency=2)


def test_special_tokens_have_roberta_ids(tokenizer: CaptionTokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.mask_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert 256 + len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 600


def test_encode_batch_frames_and_pads(tokenizer: CaptionTokenizer) -> None:
    texts = ["piano in C major at 120 bpm", "organ"]
    ids, mask = tokenizer.encode_batch(texts, max_length=16)
    assert ids.shape == mask.shape == (2, 16)
    assert ids.dtype == np.int64 and mask.dtype == np.bool_
    for row in range(2):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # valid tokens first, then padding
        assert ids[row, 0] == tokenizer.bos_id and ids[row, n - 1] == tokenizer.eos_id
        assert (ids[row, n:] == tokenizer.pad_id).all()
        assert not np.isin(ids[row, 1 : n - 1], [0, 1, 2, 3, 4]).any()  # no specials inside the caption
    # Merges learned from the captions: a seen caption takes far fewer tokens than its bytes.
    assert mask[0].sum() - 2 < len(texts[0]) // 2


def test_truncation_keeps_eos(tokenizer: CaptionTokenizer) -> None:
    long = " ".join(["violin in A minor at 90 bpm"] * 20)
    ids, mask = tokenizer.encode_batch([long], max_length=12)
    assert mask.all()
    assert ids[0, 0] == tokenizer.bos_id and ids[0, -1] == tokenizer.eos_id
    full, _ = tokenizer.encode_batch([long], max_length=400)
    np.testing.assert_array_equal(ids[0, :-1], full[0, :11])  # the first 10 caption tokens, kept in order
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode_batch(["x"], max_length=1)


@pytest.mark.parametrize(
    "text", ["cello in E minor at 60 bpm", "An unseen zither caption, 200 BPM!", "café ♪ naïve 音楽", "  spaces  ", ""]
)
def test_decode_round_trip(tokenizer: CaptionTokenizer, text: str) -> None:
    ids, mask = tokenizer.encode_batch([text], max_length=64)
    assert tokenizer.unk_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids[0][mask[0]]) == text


def test_training_is_deterministic_and_order_free(captions: list[str], tokenizer: CaptionTokenizer) -> None:
    again = train_tokenizer(list(reversed(captions)), vocab_size=600, min_frequency=2)
    assert again.to_json() == tokenizer.to_json()


def test_json_save_load(tokenizer: CaptionTokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = CaptionTokenizer.load(path)
    assert loaded.to_json() == tokenizer.to_json() == CaptionTokenizer.from_json(tokenizer.to_json()).to_json()
    texts = ["flute in D major at 144 bpm", "Solo organ, B flat major, 72 BPM"]
    for a, b in zip(tokenizer.encode_batch(texts, 24), loaded.encode_batch(texts, 24), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments(captions: list[str]) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(captions, vocab_size=100)
    with pytest.raises(ValueError, match="caption"):
        train_tokenizer([])


@pytest.mark.parametrize("text", ["piano </s><pad> in C", "<s><mask><unk> organ", "</s>"])
def test_special_token_strings_in_a_caption_are_text(tokenizer: CaptionTokenizer, text: str) -> None:
    ids, mask = tokenizer.encode_batch([text], max_length=64)
    n = int(mask[0].sum())
    assert ids[0, 0] == tokenizer.bos_id and ids[0, n - 1] == tokenizer.eos_id
    assert not np.isin(ids[0, 1 : n - 1], [0, 1, 2, 3, 4]).any()  # no EOS/PAD/... ids from the caption's text
    assert tokenizer.decode(ids[0][mask[0]]) == text
    loaded = CaptionTokenizer.from_json(tokenizer.to_json())  # the JSON round trip keeps the protection
    np.testing.assert_array_equal(loaded.encode_batch([text], max_length=64)[0], ids)
