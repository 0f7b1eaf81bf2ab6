"""``python -m infra.raynode start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...``: Ray's own
``ray start``, for a node that joins a loopback head on the same machine (``longplay stack join``).

Plain ``ray start`` cannot do that while keeping every port on 127.0.0.1:

- it treats 127.0.0.1 in ``--address`` and ``--node-ip-address`` as "this machine" and swaps in the routable IP
  (``services.resolve_ip_for_localhost``), and Ray's processes bind all interfaces for any node IP other than
  127.0.0.1 (measured: GCS and raylet then listen on ``*``);
- single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which keeps 127.0.0.1 for the head, refuses to
  start a non-head node.

So this runs the same CLI with both addresses kept as given. The environment still carries single-machine mode, so
every process the node starts (raylet, agents, workers) resolves 127.0.0.1 as the head's processes do; only this
launcher is allowed to join. Nothing else of ``ray start`` changes.
"""

from __future__ import annotations

import sys


def main() -> int:
    from ray._private import ray_constants, services
    from ray.scripts import scripts

    ray_constants.ENABLE_RAY_CLUSTER = True  # let this process start a non-head node
    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 for the node and the head's address
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main())
