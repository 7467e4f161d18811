"""``python -m tokenhive.workers --broker ipc://... --backend echo --model echo --slots 4``"""

from __future__ import annotations

import argparse

from tokenhive.workers.command import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenhive.workers", description="Run one tokenhive worker."
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
