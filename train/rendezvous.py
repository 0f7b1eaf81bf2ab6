"""Where the ranks of a training run meet: torch's process group, kept on loopback when the run is.

Ray Train's ``TorchConfig`` joins the workers through ``env://`` with ``MASTER_ADDR`` = rank 0's node IP, and torch's
``TCPStore`` server listens on every interface (``[::]``) whatever that address is; gloo binds the address the host
name resolves to. On the local stack every Ray node has the IP 127.0.0.1, so nothing outside this machine can (or
should) reach a rank, yet the rendezvous port was open to the network. :class:`RendezvousConfig` is ``TorchConfig``
with one difference: when every worker's node IP is loopback, rank 0 binds the store's socket to 127.0.0.1 itself and
hands it to ``TCPStore`` (``master_listen_fd``), and gloo and NCCL are pinned to the loopback interface
(``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``). On a real cluster (routable node IPs) Ray's own setup runs as is.

DeepSpeed's ``init_distributed`` finds the process group already up and uses it, as it did with Ray's.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from pipeline.cluster import is_loopback

LOOPBACK = "127.0.0.1"

# The socket rank 0's store will serve, bound by _listen and handed to TCPStore by _join (one worker process).
_listener: socket.socket | None = None


@dataclass
class RendezvousConfig(TorchConfig):
    """``TorchConfig`` whose process group binds loopback only when all workers run on loopback nodes."""

    @property
    def backend_cls(self):
        return _RendezvousBackend


class _RendezvousBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: RendezvousConfig) -> None:
        if not all(is_loopback(address) for address in worker_group.execute(ray.util.get_node_ip_address)):
            super().on_start(worker_group, backend_config)
            return
        backend = backend_config.backend or "gloo"
        port = worker_group.execute_single(0, _listen)
        worker_group.execute(_pin_to_loopback, port=port)
        if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v1 sets them in on_training_start
            worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, WORLD_SIZE, ... as Ray does
        size = len(worker_group)
        joins = [
            worker_group.execute_single_async(rank, _join, backend, rank, size, port, backend_config.timeout_s)
            for rank in range(size)
        ]
        ray.get(joins)


def loopback_interface() -> str:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    names = {name for _, name in socket.if_nameindex()}
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise RuntimeError(f"no loopback interface among {sorted(names)}")


def _listen() -> int:
    """Rank 0: bind the store's listening socket on 127.0.0.1 (a free port) and keep it for :func:`_join`."""
    global _listener
    if _listener is not None:
        _listener.close()
    _listener = socket.create_server((LOOPBACK, 0), backlog=128)
    return _listener.getsockname()[1]


def _pin_to_loopback(port: int) -> None:
    interface = loopback_interface()
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface
    )


def _join(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """Join the process group through a TCPStore on 127.0.0.1:``port`` (rank 0 serves it from its bound socket)."""
    global _listener
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        listener, _listener = _listener, None
        if listener is None:
            raise RuntimeError("rendezvous: rank 0 has no listening socket (_listen did not run in this process)")
        # The store owns the descriptor from here on (libuv closes it with the store).
        store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout, master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    if backend == "nccl":  # what Ray's setup does, so a hung collective fails instead of hanging
        if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
