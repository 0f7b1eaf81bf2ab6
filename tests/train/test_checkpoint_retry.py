"""Checkpoint uploads ride out S3 failures (issue 15 item 10): Ray Train's checkpoint filesystem keeps its retries when
Ray pickles it to the workers, and an upload through a proxy that drops connections to the stack's SeaweedFS lands.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
from pathlib import Path

import pytest
from pyarrow import fs

from pipeline import storage
from train import checkpoint_fs
from train.launch import storage_location


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` (host, port) that closes the next ``drop`` connections it
    accepts before a byte is read, like an S3 server going away and coming back."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream, self.drop, self.dropped = upstream, 0, 0
        self.lock = threading.Lock()
        self.live: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_next(self, connections: int) -> None:
        """Drop the next ``connections`` connections and cut the open ones, so the client has to dial again."""
        with self.lock:
            self.drop = connections
            live, self.live = self.live, []
        for sock in live:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                dropping = self.drop > 0
                if dropping:
                    self.drop -= 1
                    self.dropped += 1
            if dropping:
                _close(client)
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.live += [client, upstream]
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.server.close()
        self.fail_next(0)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


@pytest.fixture
def flaky_s3(local_stack, monkeypatch):
    """A :class:`FlakyProxy` in front of the stack's S3, with ``AWS_ENDPOINT_URL`` pointing at it."""
    host, port = local_stack.env["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    proxy = FlakyProxy((host, int(port)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    yield proxy
    proxy.close()


def _round_trip(filesystem: fs.FileSystem) -> fs.FileSystem:
    """What Ray does to ``RunConfig.storage_filesystem`` on its way to the controller and the workers."""
    return pickle.loads(pickle.dumps(filesystem))  # noqa: S301 - our own object, pickled as Ray would


def _checkpoint(directory: Path) -> dict[str, bytes]:
    """A checkpoint folder shaped like a DeepSpeed one: more files than pyarrow has IO threads, one of them 3 MiB."""
    files = {f"global_step10/rank{i}_states.pt": os.urandom(1000 + i) for i in range(12)}
    files["global_step10/model_states.pt"] = os.urandom(3 * 1024 * 1024)
    files["latest"] = b"global_step10"
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return files


def test_the_checkpoint_filesystem_keeps_its_retries_through_pickling(local_stack):
    """Before: a pickled S3FileSystem lost ``retry_strategy`` (its reduction has no such field)."""
    path, filesystem = storage_location(local_stack.s3_prefix("ckpt"))
    copy = _round_trip(filesystem)
    assert isinstance(copy, checkpoint_fs.RetryingS3FileSystem)
    assert isinstance(copy, fs.S3FileSystem)  # so Ray Train uploads it as S3 (single-threaded copy_files)
    assert copy.attempts == checkpoint_fs.S3_ATTEMPTS == 11
    assert copy.settings == filesystem.settings
    assert copy.settings[1] == local_stack.env["AWS_ENDPOINT_URL"].removeprefix("http://")
    assert copy.region == "us-east-1"
    assert path.startswith("longplay/tests/ckpt-")


def test_a_checkpoint_upload_rides_out_dropped_connections(flaky_s3, local_stack, tmp_path):
    """Issue 15 item 10: 5 connections in a row dropped during the upload; every file lands whole (before: the
    pickled S3FileSystem gave up after pyarrow's default 3 tries with 'AWS Error NETWORK_CONNECTION')."""
    uri = local_stack.s3_prefix("ckpt")
    path, filesystem = storage_location(uri)
    filesystem = _round_trip(filesystem)
    files = _checkpoint(tmp_path)
    target = f"{path}/checkpoint_00000010"
    filesystem.create_dir(target)  # what Ray Train's upload does: create the folder, then copy_files into it
    flaky_s3.fail_next(5)
    # As Ray Train's _pyarrow_fs_copy_files does for an S3FileSystem: one thread, 64 MiB chunks.
    fs.copy_files(
        str(tmp_path), target, destination_filesystem=filesystem, chunk_size=64 * 1024 * 1024, use_threads=False
    )
    assert flaky_s3.dropped == 5
    for name, data in files.items():
        assert storage.read_bytes(f"{uri}/checkpoint_00000010/{name}") == data, name
    folder = f"{uri}/checkpoint_00000010/"
    listed = {u.removeprefix(folder) for u in storage.list_uris(folder) if not u.endswith("/")}  # not pyarrow's markers
    assert listed == set(files)
