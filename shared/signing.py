"""Ed25519 signing of model manifests, and the checks a device runs before it loads a model.

The trainer signs the canonical bytes of a manifest (every field but the signature, see
``shared.codec.manifest_signing_bytes``); the manifest carries the payload's sha256 and size. A
device that checks the signature against its configured public key, then the payload against the
manifest, knows the model is the one the trainer released, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.codec import manifest_signing_bytes
from shared.errors import ConfigError, ModelVerificationError
from shared.messages import ModelManifest
from shared.model_bundle import sha256_hex

PRIVATE_KEY_FILE = "model-signing.key"
PUBLIC_KEY_FILE = "model-signing.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair (PEM) into ``directory``; refuses to overwrite an existing key."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists: refusing to overwrite a signing key")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL and 0600 from the first byte: the private key is never readable by others.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the model public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def sign_manifest(manifest: ModelManifest, private_key: Ed25519PrivateKey) -> ModelManifest:
    """``manifest`` with ``key_id`` set and an Ed25519 signature over everything else."""
    unsigned = dataclasses.replace(manifest, key_id=key_id(private_key.public_key()), signature=b"")
    signature = private_key.sign(manifest_signing_bytes(unsigned))
    return dataclasses.replace(unsigned, signature=signature)


def verify_manifest(manifest: ModelManifest, public_key: Ed25519PublicKey) -> None:
    """Raise ``ModelVerificationError`` unless ``public_key`` signed this exact manifest."""
    if not manifest.signature:
        raise ModelVerificationError(f"model {manifest.version} is not signed")
    expected_id = key_id(public_key)
    if manifest.key_id and manifest.key_id != expected_id:
        raise ModelVerificationError(
            f"model {manifest.version} is signed by key {manifest.key_id}, "
            f"this device trusts key {expected_id}"
        )
    try:
        public_key.verify(manifest.signature, manifest_signing_bytes(manifest))
    except InvalidSignature as exc:
        raise ModelVerificationError(
            f"model {manifest.version}: signature does not match its manifest"
        ) from exc


def verify_payload(manifest: ModelManifest, payload: bytes) -> None:
    """Raise ``ModelVerificationError`` unless ``payload`` is the one the manifest describes."""
    if len(payload) != manifest.size:
        raise ModelVerificationError(
            f"model {manifest.version}: payload has {len(payload)} bytes, "
            f"the manifest says {manifest.size}"
        )
    if not hmac.compare_digest(sha256_hex(payload), manifest.sha256):
        raise ModelVerificationError(f"model {manifest.version}: sha256 does not match")
