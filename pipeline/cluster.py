"""Connecting to Ray the same way from every command: ``RAY_ADDRESS`` or, without it, a local instance.

A Ray head bound to loopback (the local stack) needs two things from each client process, which this module
sets before Ray reads them: single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, so Ray keeps
``127.0.0.1`` instead of swapping in the machine's routable IP) and token auth with Ray's own token
(``~/.ray/auth_token``). Processes Ray starts (workers, job drivers) inherit both from the raylet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ray_address() -> str | None:
    """The cluster address from the standard variable, or None for a local in-process instance."""
    return os.environ.get("RAY_ADDRESS") or None


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return host in LOOPBACK


def prepare_client_env(address: str | None = None) -> None:
    """Set Ray's client-side variables for a loopback cluster and for token auth (idempotent)."""
    address = address or ray_address()
    if address and is_loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:  # Ray was imported already: its constant is read at call time, so set it too
            constants.ENABLE_RAY_CLUSTER = False
    if (Path.home() / ".ray" / "auth_token").exists() or os.environ.get("RAY_AUTH_TOKEN"):
        if os.environ.setdefault("RAY_AUTH_MODE", "token") == "token" and "ray._raylet" in sys.modules:
            # Ray was imported already and cached its config without token mode: refresh it.
            sys.modules["ray._raylet"].Config.initialize("")


def connect(num_cpus: int | None = None) -> None:
    """``ray.init`` against ``RAY_ADDRESS`` if set, else a local instance with ``num_cpus`` CPUs."""
    address = ray_address()
    prepare_client_env(address)  # before `import ray`: Ray reads these variables at import time
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)


def job_client():
    """A Ray Jobs client for ``RAY_ADDRESS`` (``host:port`` of the GCS or ``http://host:8265``)."""
    address = ray_address()
    if not address:
        raise RuntimeError("RAY_ADDRESS is not set: point it at a Ray cluster (see `longplay stack up`)")
    prepare_client_env(address)  # before `import ray`: Ray reads these variables at import time
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit_job(client, timeout_s: float = 120.0, **kwargs) -> str:
    """``client.submit_job`` that waits out a head whose job agent is still starting ("No available agent")."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
