"""pipeline.components: one loader per component, so an id one stage writes is read back by the same code."""

from __future__ import annotations

import pytest
import torch

from pipeline import components
from pipeline.generate import Bundle
from pipeline.models.autoencoder import build_autoencoder
from pipeline.weights import weights_hash
from preprocess import encode


def test_the_preset_id_preprocessing_writes_is_read_back_by_preprocessing_and_training():
    """Before: preprocessing wrote 'preset:tiny@seed0' and its own loader refused it (unknown preset 'tiny@seed0')."""
    spec = encode.resolve_vae("preset:tiny")
    assert spec.vae_id == "preset:tiny@seed0"
    again = encode.resolve_vae(spec.vae_id)  # a rerun (or a second job) given the id it recorded
    assert again.vae_id == spec.vae_id and again.config_hash == spec.config_hash
    preset = weights_hash(components.load_vae("preset:tiny"))
    assert weights_hash(components.load_vae(spec.vae_id)) == preset  # what a worker and training read

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = build_autoencoder("tiny")
    assert weights_hash(fresh) == preset  # PRESET_SEED 0, as the id says

    assert components.vae_id("preset:tiny@seed1") == encode.resolve_vae("preset:tiny@seed1").vae_id
    assert weights_hash(components.load_vae("preset:tiny@seed1")) != preset


def test_load_vae_is_frozen_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    vae = components.load_vae("preset:tiny")
    assert torch.equal(torch.rand(3), expected)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


@pytest.mark.parametrize("bad", ["preset:", "preset:tiny@seedx", "preset:tiny@seed"])
def test_malformed_preset_uris_name_the_form(bad):
    with pytest.raises(ValueError, match="preset:NAME or preset:NAME@seedN"):
        components.load_vae(bad)


def test_a_weights_hash_id_is_not_a_location():
    with pytest.raises(ValueError, match="model.vae"):
        components.load_vae("sha256:0123456789abcdef")


def test_vae_id_of_loaded_weights_is_their_hash(tmp_path):
    vae = components.load_vae("preset:tiny")
    components.save_vae(vae, tmp_path / "vae")
    assert components.vae_id(vae) == f"sha256:{weights_hash(vae)[:16]}"
    assert components.vae_id(str(tmp_path / "vae")) == components.vae_id(vae)


def test_a_bundle_loads_whole_and_its_folder_gives_its_vae(bundle_dir):
    bundle = components.load_bundle(str(bundle_dir))
    assert isinstance(bundle, Bundle) and bundle.config["preset"] == "tiny"
    assert weights_hash(bundle.autoencoder) == weights_hash(components.load_vae(bundle_dir / "autoencoder"))
    # a bundle URI given where a VAE is wanted (an MLflow model of a diffusion run) means its autoencoder/
    assert weights_hash(components.load_vae(bundle_dir)) == weights_hash(bundle.autoencoder)
    clap, tokenizer, config = components.load_clap(str(bundle_dir / "clap"))
    assert config["kind"] == "clap" and tokenizer.vocab_size == config["vocab_size"]
    assert not clap.training and not any(p.requires_grad for p in clap.parameters())
    with pytest.raises(ValueError, match="not a diffusion export"):
        components.load_bundle(str(bundle_dir / "clap"))


def test_a_clap_export_pools_captions_as_it_was_trained(tmp_path):
    """The tiny preset now pools captions by their token mean; an export records its pooling, and one written before
    that was recorded (no ``text_pooling``) keeps the <s> pooling it was trained with."""
    import json

    from bundles import write_clap_export

    folder = write_clap_export(tmp_path / "clap", ["solo piano in C major", "string quartet in D minor"])
    assert components.load_clap(str(folder))[0].config.text.pooling == "mean"
    config = json.loads((folder / "config.json").read_text())
    del config["text_pooling"]
    (folder / "config.json").write_text(json.dumps(config))
    clap, tokenizer, _ = components.load_clap(str(folder))
    assert clap.config.text.pooling == "first"
    ids, mask = (torch.from_numpy(a) for a in tokenizer.encode_batch(["solo piano in C major"], max_length=16))
    states = clap.text(ids, mask).last_hidden_state
    torch.testing.assert_close(
        clap.encode_text(ids, mask), torch.nn.functional.normalize(clap.text_projection(states[:, 0]), dim=-1)
    )
