"""Entry point: ``python -m loadtest`` and the ``digis-signal-loadtest`` script."""

from __future__ import annotations

import sys

from loadtest.cli import main as _cli_main

__all__ = ["main"]


def main() -> int:
    return _cli_main()


if __name__ == "__main__":
    sys.exit(main())
