"""The `sidecar` command line. The proxy itself arrives with issue #3; today: its version."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar import __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sidecar` console script."""
    p = argparse.ArgumentParser(prog="sidecar", description="The meshca mTLS sidecar.")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    p.parse_args(argv)
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
