"""Run a process as a device without TensorFlow would: any import of it fails.

``block_tensorflow()`` makes TensorFlow (and Keras) unimportable in this process, so a code path
that reaches for it fails loudly instead of quietly loading 0.5 GB. (The light agent's own test
runs from ``.venv-lite``, where TensorFlow is not installed at all.)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence

_BLOCKED = ("tensorflow", "keras", "tf_keras")


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".", maxsplit=1)[0] in _BLOCKED:
            raise ImportError(f"{fullname} is not installed on this device (blocked by the test)")
        return None


def block_tensorflow() -> None:
    if any(isinstance(finder, _NoTensorFlow) for finder in sys.meta_path):
        return
    if any(name.split(".")[0] in _BLOCKED for name in sys.modules):
        raise RuntimeError("TensorFlow was imported before it was blocked")
    sys.meta_path.insert(0, _NoTensorFlow())
