"""``clipfnd eval`` and ``clipfnd export`` sub-commands."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the eval and export sub-commands (filled in with the evaluation work)."""
