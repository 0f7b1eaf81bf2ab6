"""pipeline.tracking.download_model from an s3:// prefix: keys are data, and must not choose where files are written.

The listing is faked here (no service): whether a server keeps a key such as ``model/../../x`` as is differs between
servers, and the download has to refuse it either way.
"""

from __future__ import annotations

import pytest

from pipeline import storage, tracking


def _bucket(monkeypatch, keys: list[str]) -> None:
    uris = [f"s3://b/{key}" for key in keys]
    monkeypatch.setattr(storage, "list_uris", lambda prefix: iter(uris))
    monkeypatch.setattr(storage, "read_bytes", lambda uri: f"bytes of {uri}".encode())


@pytest.mark.parametrize("key", ["model/../../x", "model/sub/../../../x", "model//ABS/x", "model/.."])
def test_a_key_leading_outside_the_folder_is_refused(key, tmp_path, monkeypatch):
    """Issue 15 item 11: nothing is written, inside or outside the target, and the error names the key."""
    key = key.replace("/ABS", str(tmp_path))  # an absolute path after the prefix: model//tmp/.../x
    _bucket(monkeypatch, ["model/config.json", key])
    dst = tmp_path / "a" / "dl"
    with pytest.raises(storage.StorageError, match="outside the download folder") as err:
        tracking.download_model("s3://b/model", dst)
    assert f"s3://b/{key}" in str(err.value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/dl"]


def test_keys_inside_the_folder_download(tmp_path, monkeypatch):
    """Folder markers (keys ending in /) are not files; a .. that stays inside is fine."""
    keys = ["model/", "model/config.json", "model/clap/", "model/clap/model.safetensors", "model/a/../b.json"]
    _bucket(monkeypatch, keys)
    dst = tracking.download_model("s3://b/model/", tmp_path / "dl")
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == ["b.json", "clap/model.safetensors", "config.json"]
    assert (dst / "clap" / "model.safetensors").read_bytes() == b"bytes of s3://b/model/clap/model.safetensors"
