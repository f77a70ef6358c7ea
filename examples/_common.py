"""What every example shares: where the server is."""

from __future__ import annotations

import argparse
import os


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--address",
        default=os.environ.get("CHAINRULE_ADDRESS", "127.0.0.1:50051"),
        help="chainrule server HOST:PORT (default: $CHAINRULE_ADDRESS or 127.0.0.1:50051)",
    )
    return parser.parse_args()
