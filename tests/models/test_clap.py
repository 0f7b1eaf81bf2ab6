"""CLAP: shapes, masks, the penultimate-layer conditioning, InfoNCE, recall@k, and learning a small synthetic task."""

import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.clap import (
    CLAP,
    CLAP_PRESETS,
    AudioEncoderConfig,
    ClapConfig,
    TextEncoderConfig,
    build_clap,
    info_nce,
    recall_at_k,
)
from pipeline.text import train_tokenizer

VOCAB = 300


def tiny(**text_overrides) -> CLAP:
    torch.manual_seed(0)
    config = CLAP_PRESETS["tiny"]
    return CLAP(replace(config, text=replace(config.text, vocab_size=VOCAB, **text_overrides))).eval()


def random_text(B: int = 3, L: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (B, L))
    lengths = torch.tensor([L, L // 2, 3])[:B]
    mask = torch.arange(L) < lengths[:, None]  # (B, L)
    ids[:, 0] = 0
    return ids.masked_fill(~mask, 1), mask


def test_tiny_shapes_and_unit_norm() -> None:
    model = tiny()
    ids, mask = random_text()
    text = model.encode_text(ids, mask)
    audio = model.encode_audio(torch.randn(3, 64, 20))
    audio_masked = model.encode_audio(torch.randn(3, 64, 20), torch.arange(20) < torch.tensor([[20], [7], [1]]))
    for emb in (text, audio, audio_masked):
        assert emb.shape == (3, 64)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    cond, cond_mask = model.text_conditioning(ids, mask)
    assert cond.shape == (3, 12, 64) and torch.equal(cond_mask, mask)
    with pytest.raises(ValueError, match="max_tokens"):
        too_long = model.config.text.max_tokens + 1
        model.encode_text(torch.zeros(1, too_long, dtype=torch.long), torch.ones(1, too_long, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        model.encode_audio(torch.randn(1, 8, 20))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_penultimate_is_the_layer_before_last(pre_norm: bool) -> None:
    model = tiny(pre_norm=pre_norm)
    ids, mask = random_text()
    out = model.text(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.text.layers + 1  # embeddings + every block
    penultimate = model.text.penultimate(ids, mask)
    assert penultimate.shape == (3, 12, model.config.text.width)
    torch.testing.assert_close(penultimate, model.text.final_norm(out.hidden_states[-2]))
    assert not torch.allclose(penultimate, out.last_hidden_state, atol=1e-3)
    assert model.text(ids, mask).hidden_states is None


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_padding_does_not_change_embeddings(pooling: str) -> None:
    torch.manual_seed(0)
    # A stride that does not divide the valid length, to exercise the stem's padding.
    config = ClapConfig(
        text=TextEncoderConfig(
            vocab_size=VOCAB, width=32, layers=2, heads=2, max_tokens=16, dropout=0.0, pooling=pooling
        ),
        audio=AudioEncoderConfig(latent_channels=8, width=32, layers=2, heads=2, downsample=4, dropout=0.0),
        projection_dim=16,
    )
    model = CLAP(config).eval()
    ids = torch.randint(5, VOCAB, (1, 7))
    padded_ids = torch.cat([ids, torch.randint(5, VOCAB, (1, 9))], dim=1)  # garbage where the mask is off
    padded_mask = torch.arange(16)[None] < 7
    torch.testing.assert_close(
        model.encode_text(ids, torch.ones(1, 7, dtype=torch.bool)), model.encode_text(padded_ids, padded_mask)
    )
    latents = torch.randn(1, 8, 21)
    padded = torch.cat([latents, 100 * torch.randn(1, 8, 19)], dim=2)
    torch.testing.assert_close(model.encode_audio(latents), model.encode_audio(padded, torch.arange(40)[None] < 21))


def test_empty_mask_row_does_not_poison_the_batch() -> None:
    model = tiny()
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1] = False
    out = model(*random_text(B=2), torch.randn(2, 64, 10), mask)
    assert torch.isfinite(out.loss)


def test_info_nce_prefers_aligned_pairs() -> None:
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(1 / 0.07)
    aligned = info_nce(emb, emb, scale)
    shuffled = info_nce(emb, emb[torch.randperm(8)], scale)
    assert aligned.loss < shuffled.loss
    assert aligned.logits.shape == (8, 8)
    labels = torch.arange(8)
    logits = shuffled.logits
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(shuffled.loss, expected)


def test_forward_loss_and_temperature() -> None:
    model = tiny().train()
    assert math.isclose(model.temperature_inverse.item(), 1 / 0.07, rel_tol=1e-5)
    ids, mask = random_text()
    out = model(ids, mask, torch.randn(3, 64, 12))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.text.token_embedding.weight.grad is not None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(model.temperature_inverse.item(), 100.0, rel_tol=1e-5)  # clamped at log 100


def test_recall_at_k_on_hand_made_embeddings() -> None:
    eye = torch.eye(4)
    assert recall_at_k(eye, eye, k=1) == 1.0
    assert recall_at_k(eye, eye.flip(0), k=1) == 0.0  # every caption retrieves another audio first
    assert recall_at_k(eye, eye[[1, 0, 2, 3]], k=1) == 0.5
    assert recall_at_k(eye, eye.flip(0), k=4) == 1.0
    assert recall_at_k(eye, torch.ones(4, 4), k=1) == 0.0  # ties count against the caption
    with pytest.raises(ValueError):
        recall_at_k(eye, eye[:3], k=1)


def test_presets_and_build() -> None:
    for name in ("sa1", "sa-open"):
        config = CLAP_PRESETS[name]
        assert (config.text.width, config.text.layers, config.text.heads, config.text.max_tokens) == (768, 12, 12, 77)
        assert config.audio.latent_channels == 64 and config.projection_dim == 512
        with torch.device("meta"):
            model = build_clap(name, vocab_size=8000)
        n_text = sum(p.numel() for p in model.text.parameters())
        assert 80e6 < n_text < 100e6  # RoBERTa-base's encoder with an 8k vocabulary
    assert CLAP_PRESETS["tiny"].text.width == 64 and CLAP_PRESETS["tiny"].audio.latent_channels == 64
    assert build_clap("tiny", vocab_size=123).text.token_embedding.num_embeddings == 123
    with pytest.raises(ValueError, match="preset"):
        build_clap("huge", vocab_size=10)
    with pytest.raises(ValueError, match="heads"):
        TextEncoderConfig(width=10, heads=3)
    # The caption embedding: sa1 / sa-open pool the <s> state as RoBERTa and CLAP do; tiny the token mean.
    assert [CLAP_PRESETS[name].text.pooling for name in ("sa1", "sa-open", "tiny")] == ["first", "first", "mean"]
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")


def test_mean_pooling_is_the_masked_mean_of_the_last_layer() -> None:
    model = tiny(pooling="mean")
    ids, mask = random_text()
    states = model.text(ids, mask).last_hidden_state  # (3, 12, D)
    pooled = torch.stack([states[b, mask[b]].mean(0) for b in range(3)])
    torch.testing.assert_close(model.encode_text(ids, mask), F.normalize(model.text_projection(pooled), dim=-1))
    first = tiny(pooling="first")
    torch.testing.assert_close(
        first.encode_text(ids, mask), F.normalize(first.text_projection(states[:, 0]), dim=-1)
    )  # the same weights (seed 0): only the pooling differs


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance: a tiny CLAP learns a synthetic caption/latent task and generalises to attribute combinations it never saw.

INSTRUMENTS = ["piano", "violin", "cello", "flute", "organ", "harp", "guitar", "choir"]
KEYS = ["C major", "A minor", "G major", "E minor", "D major", "F minor"]
TEMPOS = [60, 80, 100, 120, 140, 160]
TEMPLATES = ["{i} in {k} at {t} bpm", "a {t} bpm piece for {i} in {k}", "{k} {i}, {t} bpm"]
C, T = 64, 32


class SyntheticMusic:
    """Latents (C, T) where each attribute leaves its own trace, like timbre, tonality and beat would.

    instrument: a constant channel profile; key: a channel profile oscillating at a key-specific frequency;
    tempo: a shared profile pulsing once per beat (period = 480 / bpm frames). Random phase, noise, and a random
    valid length with garbage after it (masked), so the encoder must use content, not position or padding.
    """

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.instrument = torch.randn(len(INSTRUMENTS), C, 1, generator=g)
        self.key = torch.randn(len(KEYS), C, 1, generator=g)
        self.key_freq = torch.linspace(0.15, 0.9, len(KEYS))
        self.tempo = torch.randn(C, 1, generator=g)
        self.beat_frames = 480.0 / torch.tensor(TEMPOS, dtype=torch.float32)

    def sample(self, combos: list[tuple[int, int, int]], g: torch.Generator):
        c = torch.tensor(combos)  # (N, 3): instrument, key, tempo indices
        n, t = len(combos), torch.arange(T, dtype=torch.float32)
        phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        pulse = (torch.cos(2 * math.pi * t / self.beat_frames[c[:, 2]][:, None, None] + phase) > 0.5).float()
        tonal = torch.cos(self.key_freq[c[:, 1]][:, None, None] * t + phase)
        x = self.instrument[c[:, 0]] + self.key[c[:, 1]] * tonal + self.tempo * pulse  # (N, C, T)
        x = x + 0.5 * torch.randn(n, C, T, generator=g)
        mask = torch.arange(T) < torch.randint(T // 2, T + 1, (n, 1), generator=g)  # (N, T)
        x = torch.where(mask[:, None, :], x, 3 * torch.randn(n, C, T, generator=g))
        templates = torch.randint(len(TEMPLATES), (n,), generator=g).tolist()
        captions = [
            TEMPLATES[j].format(i=INSTRUMENTS[i], k=KEYS[k], t=TEMPOS[b])
            for j, (i, k, b) in zip(templates, combos, strict=True)
        ]
        return x, mask, captions


def test_tiny_clap_learns_retrieval_on_unseen_combinations() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    combos = list(itertools.product(range(len(INSTRUMENTS)), range(len(KEYS)), range(len(TEMPOS))))
    order = torch.randperm(len(combos), generator=g).tolist()
    held_out = [combos[i] for i in order[:48]]  # 48 distinct combinations never seen in training
    train = [combos[i] for i in order[48:]]
    music = SyntheticMusic(seed=0)

    train_captions = [tpl.format(i=INSTRUMENTS[i], k=KEYS[k], t=TEMPOS[b]) for tpl in TEMPLATES for i, k, b in train]
    tokenizer = train_tokenizer(train_captions, vocab_size=400)
    model = build_clap("tiny", tokenizer.vocab_size)

    def tokens(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenizer.encode_batch(captions, max_length=16)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    # CLIP's recipe at small scale: AdamW with beta2 0.98, warmup, clipping (without them tiny CLAPs can collapse).
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    model.train()
    for _ in range(200):
        batch = [train[i] for i in torch.randint(len(train), (64,), generator=g).tolist()]
        latents, latent_mask, captions = music.sample(batch, g)
        loss = model(*tokens(captions), latents, latent_mask).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()

    model.eval()
    latents, latent_mask, captions = music.sample(held_out, torch.Generator().manual_seed(1))
    with torch.no_grad():
        recall = recall_at_k(model.encode_text(*tokens(captions)), model.encode_audio(latents, latent_mask), k=1)
    chance = 1 / len(held_out)
    print(f"held-out text->audio recall@1 {recall:.3f} (chance {chance:.3f})")
    assert recall >= 5 * chance
