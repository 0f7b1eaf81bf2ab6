"""On the local stack a training run listens on loopback only (issue 15 item 12): while a 2-worker run trains, every
socket of its Ray Train processes (workers, their children, the controller) is bound to 127.0.0.1 or ::1, the torch
store included (before: the TCPStore listened on [::], open to the network, though every node IP was 127.0.0.1).
"""

from __future__ import annotations

import threading

import psutil
import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _train_processes() -> dict[int, str]:
    """pid → actor class of the ALIVE Ray Train actors on the stack, and their child processes."""
    from ray.util.state import list_actors

    out = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False):
        if actor.class_name in ("RayTrainWorker", "TrainController") and actor.pid:
            out[actor.pid] = actor.class_name
            try:
                children = psutil.Process(actor.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            out.update({child.pid: actor.class_name for child in children})
    return out


class SocketWatch:
    """Samples the inet sockets of the run's processes every ``interval`` s until :meth:`finish`."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        # (pid, actor class, status, local ip, local port, remote port or 0)
        self.sockets: set[tuple[int, str, str, str, int, int]] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            for pid, kind in _train_processes().items():
                try:
                    connections = psutil.Process(pid).net_connections(kind="inet")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for c in connections:
                    self.sockets.add((pid, kind, c.status, c.laddr.ip, c.laddr.port, c.raddr.port if c.raddr else 0))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()

    def between_workers(self) -> set[tuple[int, int]]:
        """(listening pid, port) of the worker sockets another worker is connected to: the store's and gloo's."""
        listening = {(pid, port) for pid, kind, status, _, port, _ in self.sockets if status == psutil.CONN_LISTEN}
        workers = {pid for pid, kind, *_ in self.sockets if kind == "RayTrainWorker"}
        out = set()
        for pid, kind, status, _, _, remote in self.sockets:
            if kind == "RayTrainWorker" and status == psutil.CONN_ESTABLISHED:
                out |= {(other, port) for other, port in listening if port == remote and other in workers - {pid}}
        return out


def test_a_two_worker_run_binds_every_socket_to_loopback(local_stack, ray_on_stack, latent_dataset, train_config):
    from train.launch import launch

    cfg = train_config("clap", latent_dataset, local_stack.s3_prefix("checkpoints"), "t-loopback", run__max_steps=20)
    watch = SocketWatch()
    try:
        result = launch(cfg)
    finally:
        watch.finish()
    assert result.error is None, result.error
    assert result.metrics["step"] == 20
    workers = {pid for pid, kind, *_ in watch.sockets if kind == "RayTrainWorker"}
    assert len(workers) >= 2, workers
    # The ranks were seen connected to each other (rendezvous store, gloo pairs): the check covered them.
    assert len(watch.between_workers()) >= 2, sorted(watch.sockets)
    routable = sorted(s for s in watch.sockets if s[3] not in LOOPBACK)
    assert not routable, routable
