"""``har watch`` and ``har confirm`` (being written)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the dashboard's subcommands."""
