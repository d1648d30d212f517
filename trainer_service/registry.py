"""The model registry: every version the trainer produced, what it was trained on, and which one
devices should run.

Layout under ``root``::

    versions/<version>/saved_model/      the SavedModel (as ``export_version`` wrote it)
    versions/<version>/metrics.json ...  metrics, confusion.png, learning_curves.png, config.json,
                                         data_summary.json
    versions/<version>/release.json      {"parent", "sha256", "size", "created", "status", ...}
    versions/<version>/model.bundle      the payload devices download (its sha256 is above)
    versions/<version>/manifest.json     the signed manifest last published for it
    CURRENT                              {"current": version, "history": [older currents]}

Versions are immutable once added. Promoting a version signs a fresh manifest for it (a newer
``created``), so devices accept it even when it is an older version brought back by a rollback,
while a replayed stale manifest is still refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activity_model import signatures
from activity_model.loading import load_model
from shared import codec
from shared.errors import ConfigError, ModelError, PayloadError
from shared.fileio import write_atomically
from shared.messages import InputSpec, ModelManifest
from shared.model_bundle import pack_model_dir, sha256_hex
from shared.signing import sign_manifest
from shared.topics import is_valid_id

if TYPE_CHECKING:
    from activity_model.runtime import ActivityModel

log = logging.getLogger(__name__)

RELEASE_FILE = "release.json"
BUNDLE_FILE = "model.bundle"
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "CURRENT"

# Which metrics travel in the manifest: a small, flat summary devices and dashboards can show.
_MANIFEST_METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: str
    parent: str | None
    sha256: str
    size: int
    created: float
    labels: tuple[str, ...]
    input: InputSpec
    metrics: dict[str, float]
    summary: dict[str, Any]
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parent": self.parent,
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created,
            "labels": list(self.labels),
            "input": {"window": self.input.window, "sample_rate_hz": self.input.sample_rate_hz},
            "metrics": self.metrics,
            "summary": self.summary,
            "path": str(self.path),
        }


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"test_accuracy": .., "test_macro_f1": .., ...}`` from a nested metrics.json."""
    flat: dict[str, float] = {}
    for section in ("test", "validation", "confirmed"):
        values = metrics.get(section)
        if isinstance(values, dict):
            for name in _MANIFEST_METRICS:
                if isinstance(values.get(name), (int, float)):
                    flat[f"{section}_{name}"] = round(float(values[name]), 6)
    return flat


class ModelRegistry:
    def __init__(self, root: Path, *, create: bool = True) -> None:
        """The registry in ``root``; with ``create=False`` it must exist already (ConfigError)."""
        self._root = root
        self._versions = root / "versions"
        if create:
            self._versions.mkdir(parents=True, exist_ok=True)
        elif not self._versions.is_dir():
            raise ConfigError(f"no model registry in {root} (nothing was ever registered there)")

    @property
    def root(self) -> Path:
        return self._root

    def new_version_name(self, arch: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{arch}-{stamp}"
        suffix = 1
        while (self._versions / name).exists():
            suffix += 1
            name = f"{arch}-{stamp}-{suffix}"
        return name

    # ------------------------------------------------------------------ adding
    def add(
        self,
        exported: Path,
        *,
        parent: str | None,
        summary: dict[str, Any] | None = None,
    ) -> VersionInfo:
        """Take in a folder written by ``export_version``; its name becomes the version."""

        version = exported.name
        if not is_valid_id(version):
            raise ConfigError(f"version name {version!r} is not a valid id")
        target = self._versions / version
        if target.exists():
            raise ModelError(f"version {version} is already registered")
        # Refuse what devices could not run, on either runtime.
        model = load_model(exported / "saved_model", "tensorflow")
        self._check_litert_form(exported / "saved_model", model)
        payload = pack_model_dir(exported / "saved_model")
        metrics = json.loads((exported / "metrics.json").read_text())
        release = {
            "version": version,
            "parent": parent,
            "sha256": sha256_hex(payload),
            "size": len(payload),
            "created": time.time(),
            "labels": list(model.labels),
            "input": {
                "window": model.input_spec.window,
                "channels": model.input_spec.channels,
                "sample_rate_hz": model.input_spec.sample_rate_hz,
            },
            "metrics": flat_metrics(metrics),
            "summary": summary or {},
        }
        write_atomically(exported / BUNDLE_FILE, payload)
        write_atomically(exported / RELEASE_FILE, json.dumps(release, indent=2).encode())
        shutil.move(str(exported), str(target))
        log.info("registered model %s (%d bytes, parent %s)", version, len(payload), parent)
        return self.get(version)

    def add_copy(self, folder: Path, *, parent: str | None) -> VersionInfo:
        """``add`` a copy of ``folder``; ``folder`` itself is left as it was."""
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder")
        # The copy is made inside the registry, so that add() moves it with a rename.
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=self._root))
        try:
            copy = staging / folder.name
            shutil.copytree(folder, copy)
            return self.add(copy, parent=parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def get(self, version: str) -> VersionInfo:
        if not is_valid_id(version):
            raise ConfigError(f"{version!r} is not a valid version name")
        path = self._versions / version
        try:
            release = json.loads((path / RELEASE_FILE).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"no model version {version!r} in {self._root}") from exc
        except (OSError, ValueError) as exc:
            raise ModelError(f"release record of {version} is unreadable: {exc}") from exc
        spec = release["input"]
        return VersionInfo(
            version=version,
            parent=release.get("parent"),
            sha256=release["sha256"],
            size=int(release["size"]),
            created=float(release["created"]),
            labels=tuple(release["labels"]),
            input=InputSpec(
                window=int(spec["window"]),
                channels=int(spec.get("channels", 3)),
                sample_rate_hz=float(spec["sample_rate_hz"]),
            ),
            metrics={k: float(v) for k, v in release.get("metrics", {}).items()},
            summary=release.get("summary", {}),
            path=path,
        )

    def versions(self) -> list[VersionInfo]:
        infos = []
        for entry in sorted(self._versions.iterdir()):
            if entry.is_dir() and (entry / RELEASE_FILE).is_file():
                infos.append(self.get(entry.name))
        return sorted(infos, key=lambda info: info.created)

    @staticmethod
    def _check_litert_form(saved_model: Path, model: ActivityModel) -> None:
        """A device model's LiteRT form must load and be the same model, if it has one."""

        if not model.personalisable:
            return
        if not (saved_model / signatures.LITERT_DIR).is_dir():
            log.warning(
                "%s has no LiteRT form: agents without TensorFlow cannot run it", saved_model
            )
            return
        lite = load_model(saved_model, "litert")
        if (lite.model_id, lite.labels) != (model.model_id, model.labels):
            raise ModelError(f"the LiteRT form in {saved_model} is another model")

    def saved_model_dir(self, version: str) -> Path:
        return self.get(version).path / "saved_model"

    def payload(self, version: str) -> bytes:
        info = self.get(version)
        payload = (info.path / BUNDLE_FILE).read_bytes()
        if sha256_hex(payload) != info.sha256:
            raise ModelError(f"bundle of {version} no longer matches its recorded sha256")
        return payload

    def manifest(self, version: str) -> ModelManifest | None:
        """The signed manifest last issued for ``version``, if any."""
        path = self.get(version).path / MANIFEST_FILE
        try:
            return codec.decode_manifest(path.read_bytes())
        except FileNotFoundError:
            return None
        except PayloadError as exc:
            raise ModelError(f"stored manifest of {version} is unreadable: {exc}") from exc

    # ------------------------------------------------------------------ current version
    def _pointer(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self._root / POINTER_FILE).read_text())
        except FileNotFoundError:
            return {"current": None, "history": []}
        return doc

    def current(self) -> str | None:
        current: str | None = self._pointer().get("current")
        return current

    def promote(
        self, version: str, private_key: Ed25519PrivateKey, *, chunk_size: int
    ) -> ModelManifest:
        """Make ``version`` the one devices run: sign a fresh manifest and record it."""
        info = self.get(version)
        self.payload(version)  # the bundle must still be intact
        chunks = max(1, -(-info.size // chunk_size))
        manifest = sign_manifest(
            ModelManifest(
                version=version,
                parent=info.parent,
                sha256=info.sha256,
                size=info.size,
                chunks=chunks,
                labels=info.labels,
                input=info.input,
                metrics=info.metrics,
                created=time.time(),
            ),
            private_key,
        )
        write_atomically(info.path / MANIFEST_FILE, codec.encode_manifest(manifest))
        pointer = self._pointer()
        previous = pointer.get("current")
        history = [v for v in pointer.get("history", []) if v != version]
        if previous is not None and previous != version:
            history.append(previous)
        write_atomically(
            self._root / POINTER_FILE,
            json.dumps({"current": version, "history": history[-50:]}).encode(),
        )
        log.info("promoted model %s (was %s)", version, previous)
        return manifest

    def history(self) -> list[str]:
        """Earlier current versions, oldest first (the last one is the rollback target)."""
        history: list[str] = self._pointer().get("history", [])
        return history

    def rollback_target(self) -> str:
        """The version a rollback returns to: the last current before this one."""
        history = self.history()
        if not history:
            raise ConfigError("no earlier version to roll back to")
        return history[-1]

    def remove_leftovers(self) -> None:
        """Delete half-written version folders a crash left behind."""
        for entry in self._versions.iterdir():
            if entry.name.startswith(".") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def __repr__(self) -> str:
        return f"ModelRegistry({os.fspath(self._root)!r})"
