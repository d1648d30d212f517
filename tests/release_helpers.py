"""Tiny but real model releases for agent and trainer tests: trained, exported, signed
(``simulator.tiny_model``, which ``bench/chaos.py`` uses too)."""

from simulator.tiny_model import (
    CHUNK_SIZE,
    Release,
    Releases,
    export_tiny_version,
    make_releases,
)

__all__ = ["CHUNK_SIZE", "Release", "Releases", "export_tiny_version", "make_releases"]
