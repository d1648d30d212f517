"""``import tensorflow`` for every module that uses it, with TensorFlow's native log quieted.

TensorFlow's C++ core prints its own lines on import and on first use (CPU features, ...),
filtered by the ``TF_CPP_MIN_LOG_LEVEL`` environment variable, which it reads once, when it is
first imported. ``import_tensorflow`` sets that variable from the level of the Python
``tensorflow`` logger (``har --log-level`` sets it: ERROR unless DEBUG), unless the environment
sets it already, then imports.

Two lines ignore that variable (TensorFlow 2.21): "oneDNN custom operations are on", written by
each of two of its libraries as they load, each after absl's "All log messages before
absl::InitializeLog() is called are written to STDERR". Unless the level lets INFO through, the
import runs with file descriptor 2 captured, and everything it wrote but those lines is written
back afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

NATIVE_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# Written while TensorFlow loads, whatever TF_CPP_MIN_LOG_LEVEL says: INFO, nothing to act on.
LOAD_NOISE = (
    b"All log messages before absl::InitializeLog() is called are written to STDERR",
    b"oneDNN custom operations are on",
)


def native_log_level(logger: logging.Logger) -> str:
    """TensorFlow's native level for what ``logger`` lets through: 0 everything, 1 no INFO,
    2 no WARNING, 3 no ERROR."""
    for level, native in ((logging.INFO, "0"), (logging.WARNING, "1"), (logging.ERROR, "2")):
        if logger.isEnabledFor(level):
            return native
    return "3"


def import_tensorflow() -> Any:  # TensorFlow has no type information
    """The ``tensorflow`` module; its native log follows the ``tensorflow`` logger's level."""
    quiet: AbstractContextManager[None] = nullcontext()
    if "tensorflow" not in sys.modules:  # once imported, the variable has been read
        level = os.environ.setdefault(
            NATIVE_LOG_LEVEL, native_log_level(logging.getLogger("tensorflow"))
        )
        if level != "0":
            quiet = without_lines(LOAD_NOISE)
    with quiet:
        import tensorflow as tf
    return tf


@contextmanager
def without_lines(markers: tuple[bytes, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (native code writes there, past Python's ``sys.stderr``) and,
    at the end, write back every line that holds none of ``markers``.

    Whatever other threads write meanwhile is delayed, not lost.
    """
    sys.stderr.flush()
    try:
        original = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)
            os.close(original)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().splitlines(keepends=True)
                if not any(marker in line for marker in markers)
            ]
            with open(2, "wb", closefd=False) as stderr:
                stderr.writelines(kept)
