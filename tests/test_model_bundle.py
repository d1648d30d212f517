"""Model bundles and signatures: what a device checks before it loads anything."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import zlib
from pathlib import Path, PurePosixPath

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ConfigError, ModelVerificationError
from shared.messages import InputSpec, ModelManifest
from shared.model_bundle import (
    ChunkAssembler,
    pack_model_dir,
    read_bundle,
    sha256_hex,
    split_chunks,
    unpack_bundle,
)
from shared.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
    verify_payload,
)


def write_model_dir(root: Path) -> Path:
    model = root / "model"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"graph" * 100)
    (model / "variables" / "variables.index").write_bytes(b"\x00\x01index")
    (model / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
    return model


def test_pack_is_deterministic_and_unpacks_to_the_same_files(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path)
    payload = pack_model_dir(model)
    assert pack_model_dir(model) == payload
    unpack_bundle(payload, tmp_path / "copy")
    for original in model.rglob("*"):
        copy = tmp_path / "copy" / original.relative_to(model)
        assert copy.is_dir() if original.is_dir() else copy.read_bytes() == original.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy")]  # no staging left


@pytest.mark.parametrize(
    "bad_path", ["../evil", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", "", "a/./b"]
)
def test_paths_that_escape_are_refused(tmp_path: Path, bad_path: str) -> None:
    payload = msgpack.packb(
        {"kind": "har-model-bundle", "v": 1, "files": [[bad_path, b"x"]]}, use_bin_type=True
    )
    with pytest.raises(ModelVerificationError):
        unpack_bundle(payload, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize(
    "doc",
    [
        {"kind": "other", "v": 1, "files": [["a", b"x"]]},
        {"kind": "har-model-bundle", "v": 2, "files": [["a", b"x"]]},
        {"kind": "har-model-bundle", "v": 1, "files": []},
        {"kind": "har-model-bundle", "v": 1, "files": [["a", "text"]]},
        {"kind": "har-model-bundle", "v": 1, "files": [["a", b"x"], ["a", b"y"]]},
        {"kind": "har-model-bundle", "v": 1, "files": [["a", b"x"], ["a/b", b"y"]]},
    ],
)
def test_malformed_bundles_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ModelVerificationError):
        read_bundle(msgpack.packb(doc, use_bin_type=True))


def test_bundles_are_deflated_and_version_1_bundles_still_read(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path)
    payload = pack_model_dir(model)
    files = read_bundle(payload)
    assert files[PurePosixPath("saved_model.pb")] == b"graph" * 100
    legacy = msgpack.packb(
        {"kind": "har-model-bundle", "v": 1, "files": [[str(k), v] for k, v in files.items()]},
        use_bin_type=True,
    )
    assert read_bundle(legacy) == files
    assert len(payload) < len(legacy) - 400  # the 500-byte repetitive graph file deflates


def _deflated(entries: list[list[object]]) -> bytes:
    packed: bytes = msgpack.packb(
        {"kind": "har-model-bundle", "v": 2, "files": entries}, use_bin_type=True
    )
    return packed


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        # A few kilobytes that inflate to 64 MiB: refused after reading one byte past the claim.
        (["a", "zlib", 10, zlib.compress(bytes(64 * 1024 * 1024))], "not the size it says"),
        (["a", "zlib", 100, zlib.compress(b"short")], "not the size it says"),
        (["a", "zlib", 5, zlib.compress(b"short") + b"trailing"], "not the size it says"),
        (["a", "zlib", 5, b"not deflate data"], "does not inflate"),
        (["a", "zlib", 2**40, zlib.compress(b"x")], "size limit"),
        (["a", "lzma", 1, b"x"], "is not [path, 'zlib', size, bytes]"),
    ],
)
def test_deflated_entries_that_lie_are_refused(entry: list[object], why: str) -> None:
    with pytest.raises(ModelVerificationError, match=re.escape(why)):
        read_bundle(_deflated([entry]), max_bytes=1024 * 1024)


def test_inflated_total_is_bounded(tmp_path: Path) -> None:
    chunk = bytes(600 * 1024)
    entries: list[list[object]] = [
        [name, "zlib", len(chunk), zlib.compress(chunk)] for name in ("a", "b")
    ]
    with pytest.raises(ModelVerificationError, match="size limit"):
        read_bundle(_deflated(entries), max_bytes=1024 * 1024)


def test_declared_sizes_are_added_up_before_anything_is_inflated() -> None:
    # Not deflate data at all: inflating either entry would fail with "does not inflate".
    entries: list[list[object]] = [
        [name, "zlib", 600 * 1024, b"not deflate data"] for name in ("a", "b")
    ]
    with pytest.raises(ModelVerificationError, match="add up to 1228800 bytes, over its size"):
        read_bundle(_deflated(entries), max_bytes=1024 * 1024)


def test_the_assembler_never_holds_more_than_its_bound() -> None:
    with pytest.raises(ModelVerificationError, match="over the limit of 1000 bytes"):
        ChunkAssembler("v1", 2, 2000, max_bytes=1000)
    with pytest.raises(ModelVerificationError, match="cannot make"):
        ChunkAssembler("v1", 10**9, 100)


def test_size_limit_and_symlinks(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path)
    with pytest.raises(ModelVerificationError, match="exceeds"):
        pack_model_dir(model, max_bytes=1000)
    payload = pack_model_dir(model)
    with pytest.raises(ModelVerificationError, match="exceeds"):
        read_bundle(payload, max_bytes=1000)
    (model / "link").symlink_to("/etc/passwd")
    with pytest.raises(ModelVerificationError, match="symlink"):
        pack_model_dir(model)


@given(payload=st.binary(max_size=5000), chunk_size=st.integers(1, 700), data=st.data())
def test_chunks_reassemble_in_any_order(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    chunks = split_chunks("v1", payload, chunk_size)
    assert all(len(c.data) <= chunk_size for c in chunks)
    order = data.draw(st.permutations(chunks))
    assembler = ChunkAssembler("v1", len(chunks), len(payload))
    results = [assembler.add(chunk) for chunk in [*order, order[0]]]  # a duplicate too
    assert all(r is None for r in results[: len(chunks) - 1])
    assert results[len(chunks) - 1] == payload
    assert results[-1] == payload


def test_assembler_refuses_inconsistent_chunks() -> None:
    chunks = split_chunks("v1", b"x" * 100, 10)
    with pytest.raises(ModelVerificationError, match="manifest says 5"):
        ChunkAssembler("v1", 5, 100).add(chunks[0])
    assembler = ChunkAssembler("v1", 10, 15)
    assembler.add(chunks[0])
    with pytest.raises(ModelVerificationError, match="exceed"):
        assembler.add(chunks[1])
    with pytest.raises(ModelVerificationError, match="version"):
        ChunkAssembler("v2", 10, 100).add(chunks[0])


# ------------------------------------------------------------------------------ signing


def manifest_for(payload: bytes) -> ModelManifest:
    return ModelManifest(
        version="v0002",
        parent="v0001",
        sha256=sha256_hex(payload),
        size=len(payload),
        chunks=1,
        labels=("Sitting", "Walking"),
        input=InputSpec(window=80),
        metrics={"accuracy": 0.93},
        created=1_700_000_000.0,
    )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def test_keys_are_private_and_never_overwritten(keys: tuple[Path, Path]) -> None:
    private_path, public_path = keys
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(private_path.parent)
    with pytest.raises(ConfigError, match=r"not an Ed25519 private key|cannot load"):
        load_private_key(public_path)


def test_signed_manifest_verifies_and_any_change_breaks_it(keys: tuple[Path, Path]) -> None:
    private_key, public_key = load_private_key(keys[0]), load_public_key(keys[1])
    payload = b"model-bytes" * 50
    signed = sign_manifest(manifest_for(payload), private_key)
    verify_manifest(signed, public_key)
    verify_payload(signed, payload)
    for change in (
        {"size": signed.size + 1},
        {"version": "v0003"},
        {"labels": ("Walking", "Sitting")},
        {"metrics": {"accuracy": 0.99}},
        {"sha256": "0" * 64},
        {"parent": None},
    ):
        with pytest.raises(ModelVerificationError, match="signature does not match"):
            verify_manifest(dataclasses.replace(signed, **change), public_key)  # type: ignore[arg-type]


def test_unsigned_foreign_and_tampered_payloads_are_refused(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private_key, public_key = load_private_key(keys[0]), load_public_key(keys[1])
    payload = b"model-bytes" * 50
    manifest = manifest_for(payload)
    with pytest.raises(ModelVerificationError, match="not signed"):
        verify_manifest(manifest, public_key)
    foreign_private, _ = generate_keypair(tmp_path / "other")
    foreign = sign_manifest(manifest, load_private_key(foreign_private))
    with pytest.raises(ModelVerificationError, match="signed by key"):
        verify_manifest(foreign, public_key)
    signed = sign_manifest(manifest, private_key)
    tampered = bytearray(payload)
    tampered[10] ^= 0xFF
    with pytest.raises(ModelVerificationError, match="sha256 does not match"):
        verify_payload(signed, bytes(tampered))
    with pytest.raises(ModelVerificationError, match="bytes"):
        verify_payload(signed, payload + b"x")
