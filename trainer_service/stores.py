"""Opening the trainer's store by its URL: SQLite (``trainer_service.store``) or PostgreSQL
(``trainer_service.store_postgres``, imported only for a postgresql:// URL: psycopg is an
optional dependency)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from shared.errors import StorageError
from trainer_service.store import SqliteStore, Store


def open_store(
    url: str, *, password: str | None = None, clock: Callable[[], float] = time.time
) -> Store:
    """The store ``url`` names: ``sqlite:///ABSOLUTE/PATH`` or ``postgresql://...`` (with
    ``password`` if given; psycopg is imported only then)."""
    if url.startswith("sqlite://"):
        return SqliteStore(Path(url.removeprefix("sqlite://")), clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from trainer_service.store_postgres import PostgresStore
        except ImportError as exc:
            raise StorageError(
                f"a postgresql:// store needs psycopg: pip install 'har-edge[postgres]' ({exc})"
            ) from exc
        return PostgresStore(url, password=password, clock=clock)
    raise StorageError("store.url must start with sqlite:// or postgresql://")
