"""The caption tokenizer: a RoBERTa-style byte-level BPE trained on the dataset's own captions.

Stable Audio's CLAP text encoder is RoBERTa-like; we keep RoBERTa's conventions (byte-level BPE, the special
tokens ``<s> <pad> </s> <unk> <mask>`` at ids 0..4, every sequence framed as ``<s> ... </s>``) but learn the merges
from our captions, so nothing is fetched from a model hub. The whole tokenizer round-trips through one JSON string
(the `tokenizers` library's own format), which is what checkpoints and exports carry.

    ids:  <s>  ▁piano  ▁in  ▁C  </s>  <pad>  <pad>      (B, L) int64, L = max_length
    mask:  1     1      1    1    1     0      0        (B, L) bool, True = a real token
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# RoBERTa's special tokens, in RoBERTa's id order; the trainer assigns ids in this order.
BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, EOS, UNK, MASK)


class CaptionTokenizer:
    """Byte-level BPE with RoBERTa framing; ``encode_batch`` gives fixed-length ids and a validity mask."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # A caption is text, never markup: "</s><pad>" typed into a caption must become the bytes it spells, not
        # EOS/PAD ids that end the caption early or hide tokens from the mask. Not stored in the JSON, so set here
        # for trained and loaded tokenizers alike.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id: int = ids[BOS]
        self.pad_id: int = ids[PAD]
        self.eos_id: int = ids[EOS]
        self.unk_id: int = ids[UNK]
        self.mask_id: int = ids[MASK]

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the text encoder's embedding rows)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize captions to ``(ids, mask)``, both (B, max_length): ids int64, mask bool (True = real token).

        Each row is ``<s> tokens </s>`` then ``<pad>``; captions longer than ``max_length - 2`` BPE tokens are cut
        at the end and still closed with ``</s>``. Special-token strings inside a caption are encoded as text.
        """
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold <s> and </s>, got {max_length}")
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of captions, not one string")
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(texts), max_length), dtype=bool)  # (B, L)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            body = encoding.ids[: max_length - 2]
            n = len(body) + 2
            ids[row, :n] = [self.bos_id, *body, self.eos_id]
            mask[row, :n] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Ids of one caption back to text (special tokens dropped unless asked for)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The full tokenizer (vocabulary, merges, pre-tokenizer, decoder) as a JSON string."""
        return self._tokenizer.to_str(pretty=False)

    @classmethod
    def from_json(cls, s: str) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _empty_tokenizer() -> Tokenizer:
    # No prefix space, as in RoBERTa: decode(encode(text)) == text exactly.
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(captions: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> CaptionTokenizer:
    """Learn byte-level BPE merges from ``captions``; the same captions give the same tokenizer.

    All 256 byte symbols are always in the vocabulary, so any caption (any script, emoji) encodes without
    ``<unk>``; ``vocab_size`` caps merges + bytes + specials and may not be reached on a small corpus.
    """
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} (256 bytes + specials), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    # Sorted so the result does not depend on the order the shards were listed in.
    corpus = sorted(captions)
    if not corpus:
        raise ValueError("train_tokenizer needs at least one caption")
    tokenizer = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    # Stored in the JSON so the file alone frames captions like RoBERTa for other tools; encode_batch frames
    # (and truncates) explicitly and does not rely on it.
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS, eos), (BOS, bos), trim_offsets=False, add_prefix_space=False
    )
    return CaptionTokenizer(tokenizer)
