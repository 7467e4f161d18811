#!/usr/bin/env python3
"""llmkit's ``local`` provider sidecar, backed by a tokenhive pool.

Point llmkit's ``sidecar_path`` at this file and its ``python_path`` at the Python of the
environment tokenhive is installed in; ``tokenhive sidecar --path`` prints this path. It runs
``tokenhive sidecar`` (see ``tokenhive.clients.sidecar.command``); llmkit passes no arguments,
so it is configured by environment variables (llmkit's ``env``): ``TOKENHIVE_BROKER``,
``TOKENHIVE_CONFIG``, ``TOKENHIVE_LOG_LEVEL``, ``TOKENHIVE_LOG_FORMAT``.
"""

import os
import sys


def _main() -> int:
    # Run by path, this file's folder is sys.path[0]: its sibling modules must not shadow
    # anything, so tokenhive is imported absolutely, from the installed package only.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        from tokenhive.clients.sidecar.command import main
    except ImportError as exc:
        sys.stderr.write(
            f"tokenhive sidecar: cannot import tokenhive ({exc}); run this script with the "
            "Python of the environment tokenhive is installed in (llmkit: python_path)\n"
        )
        return 1
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_main())
