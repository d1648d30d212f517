"""Model releases on the device's disk: verified on arrival, and again every time one is loaded.

Layout under ``models_dir``::

    <version>/manifest.json     the signed manifest, as received
    <version>/model.bundle      the payload whose sha256 the manifest names
    <version>/saved_model/      the unpacked SavedModel (a cache, checked against the bundle)
    CURRENT                     {"current": version, "previous": version | null}

Nothing is loaded unless the manifest's signature checks out against the configured public key,
the bundle matches the manifest's size and sha256, and the unpacked files equal the bundle's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import codec
from shared.errors import ModelError, ModelVerificationError, PayloadError
from shared.fileio import write_atomically
from shared.messages import ModelManifest
from shared.model_bundle import DEFAULT_MAX_BUNDLE_BYTES, read_bundle, write_files
from shared.signing import verify_manifest, verify_payload
from shared.topics import is_valid_id

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUNDLE_FILE = "model.bundle"
SAVED_MODEL_DIR = "saved_model"
POINTER_FILE = "CURRENT"


def refuse_replay(manifest: ModelManifest, installed: ModelManifest | None) -> None:
    """A signed manifest older than the installed one is a replayed release: never install it."""
    if installed is not None and manifest.created < installed.created:
        raise ModelError(
            f"manifest of {manifest.version} is older than the installed "
            f"{installed.version}'s: a replayed release is not installed"
        )


@dataclass(frozen=True, slots=True)
class VerifiedRelease:
    """A release whose signature and bytes were checked just now."""

    manifest: ModelManifest
    saved_model_dir: Path


class ReleaseStore:
    def __init__(
        self,
        models_dir: Path,
        public_key: Ed25519PublicKey | None,
        *,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    ) -> None:
        self._dir = models_dir
        self._public_key = public_key
        self._max_bytes = max_bytes  # of a bundle, and of its files once inflated
        models_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ verification
    def verify_manifest(self, manifest: ModelManifest) -> None:
        if self._public_key is None:
            raise ModelVerificationError(
                "no public key configured (public_key): this device accepts no models"
            )
        verify_manifest(manifest, self._public_key)

    def _release_dir(self, version: str) -> Path:
        if not is_valid_id(version):
            raise ModelVerificationError(f"invalid model version {version!r}")
        return self._dir / version

    def has(self, version: str) -> bool:
        return (self._release_dir(version) / BUNDLE_FILE).is_file()

    # ------------------------------------------------------------------ storing
    def store(self, manifest: ModelManifest, payload: bytes) -> None:
        """Keep a verified release on disk (all or nothing)."""
        self.verify_manifest(manifest)
        verify_payload(manifest, payload)
        # Refuse a payload that is not a well-formed bundle, or too large once inflated.
        read_bundle(payload, max_bytes=self._max_bytes)
        target = self._release_dir(manifest.version)
        if target.exists():
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=self._dir))
        try:
            write_atomically(staging / MANIFEST_FILE, codec.encode_manifest(manifest))
            write_atomically(staging / BUNDLE_FILE, payload)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def open(self, version: str) -> VerifiedRelease:
        """Verify a stored release from scratch and return its SavedModel directory."""
        release = self._release_dir(version)
        try:
            manifest = codec.decode_manifest((release / MANIFEST_FILE).read_bytes())
            payload = (release / BUNDLE_FILE).read_bytes()
        except (OSError, PayloadError) as exc:
            raise ModelVerificationError(f"release {version} is unreadable: {exc}") from exc
        if manifest.version != version:
            raise ModelVerificationError(
                f"release {version} holds a manifest of {manifest.version}"
            )
        self.verify_manifest(manifest)
        verify_payload(manifest, payload)
        files = read_bundle(payload, max_bytes=self._max_bytes)
        saved_model = release / SAVED_MODEL_DIR
        if not self._matches(saved_model, files):
            if saved_model.exists():
                log.warning("unpacked files of %s differ from its bundle: unpacking again", version)
                shutil.rmtree(saved_model)
            write_files(files, saved_model)
        return VerifiedRelease(manifest=manifest, saved_model_dir=saved_model)

    @staticmethod
    def _matches(directory: Path, files: Mapping[PurePosixPath, bytes]) -> bool:
        if not directory.is_dir():
            return False
        on_disk = {
            path.relative_to(directory).as_posix(): path
            for path in directory.rglob("*")
            if path.is_file() or path.is_symlink()
        }
        expected = {str(path): data for path, data in files.items()}
        if set(on_disk) != set(expected):
            return False
        return all(
            not on_disk[name].is_symlink() and on_disk[name].read_bytes() == data
            for name, data in expected.items()
        )

    # ------------------------------------------------------------------ current / previous
    def pointer(self) -> tuple[str | None, str | None]:
        """(current, previous) versions, or (None, None) on a fresh device."""
        try:
            doc = json.loads((self._dir / POINTER_FILE).read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            raise ModelVerificationError(
                f"{self._dir / POINTER_FILE} is unreadable: {exc}"
            ) from exc
        return doc.get("current"), doc.get("previous")

    def set_current(self, version: str) -> None:
        current, previous = self.pointer()
        if current == version:
            return
        doc = {"current": version, "previous": current if current is not None else previous}
        write_atomically(self._dir / POINTER_FILE, json.dumps(doc).encode())

    def rollback(self) -> str:
        """Make the previous version current again; returns it."""
        current, previous = self.pointer()
        if previous is None or not self.has(previous):
            raise ModelVerificationError("there is no previous model version to roll back to")
        write_atomically(
            self._dir / POINTER_FILE,
            json.dumps({"current": previous, "previous": current}).encode(),
        )
        return previous

    def remove_leftovers(self) -> None:
        """Delete staging directories a crash left behind (call before anything is stored)."""
        for entry in self._dir.iterdir():
            if entry.name.startswith(".") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def prune(self) -> list[str]:
        """Delete every release but the current and the previous one."""
        keep = {v for v in self.pointer() if v is not None}
        removed = []
        for entry in self._dir.iterdir():
            if entry.is_dir() and entry.name not in keep and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed
