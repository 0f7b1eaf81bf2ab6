"""A tiny random T5 encoder and its tokenizer, written offline: the stand-in for T5-base in CPU tests.

The tokenizer is a T5 (Unigram, SentencePiece-style ``▁`` word starts) over a few dozen audio words plus single
characters, so any caption tokenizes (unknown characters become ``<unk>``); its ids follow T5's layout
(``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and every caption ends with ``</s>``.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a an of and with in on at to from by is are very slow fast loud soft quiet deep bright low high "
    "sound sounds noise music song beat rhythm melody drum drums kick snare piano guitar bass synth violin "
    "voice vocals choir bird birds dog dogs bark barks rain wind water thunder car engine door bell clock "
    "ambient techno jazz rock house bpm"
).split()
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+"
MAX_TOKENS = 128  # Stable Audio Open's tokenizer/ has model_max_length 128, which diffusers' pipeline pads to


def write_tiny_t5(directory: Path, d_model: int = 16, seed: int = 0) -> Path:
    """Write a random T5 encoder (2 layers, 4 heads, width ``d_model``; the same weights for the same seed) and its
    tokenizer into ``directory`` with ``save_pretrained``; :meth:`pipeline.t5.T5Conditioner.load` reads it back."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of the 4 heads, got {d_model}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # whole words are likelier pieces than spelling them out; the scores are log-probabilities
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -4.0) for word in WORDS] + [(char, -8.0) for char in CHARACTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_TOKENS)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is untouched
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    encoder.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
