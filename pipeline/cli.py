"""``python -m pipeline.cli`` and ``pipeline.cli:main``, kept while callers move: the ``longplay`` command tree is
``infra/cli.py``, at the top of the import graph.

The one import from ``pipeline`` into a stage, named as pending in tests/test_layering.py. Callers left:
infra/submit.py (the Ray Job entrypoint), tests/pipeline/test_config.py, tests/pipeline/test_generate.py,
tests/train/test_kill_and_relaunch.py and tests/test_end_to_end.py. Delete this module when they use ``infra.cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``infra.cli.main``."""
    from infra.cli import main as longplay

    return longplay(argv)


if __name__ == "__main__":
    sys.exit(main())
