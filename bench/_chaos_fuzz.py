"""Hostile payloads for ``bench/chaos.py``: every category the issue names, for every message kind.

``Fuzzer(seed).payload(kind)`` returns ``(category, bytes)``. Kinds are the contract's messages:
``sensor`` and ``chunk`` (msgpack), ``prediction``, ``confirmation``, ``status``, ``command``
(the trainer's), ``device_command`` and ``manifest`` (JSON). Categories:

- ``random_bytes``: 0-512 random bytes;
- ``mutated_msgpack`` / ``mutated_json``: a valid message of the kind (as msgpack / as JSON),
  then byte flips, truncation, insertion, a field dropped or given another type;
- ``lone_surrogates``: a text field holding an unpaired surrogate (JSON ``\\ud800`` escape, or the
  raw CESU bytes ED A0 80 in JSON and msgpack strings);
- ``nan``: NaN, Infinity, -Infinity, 1e999 in numeric fields (JSON literals and msgpack floats);
- ``huge``: 64 KiB to just under the broker's 1 MiB max_packet_size;
- ``deep_nesting``: arrays or maps nested 1,000 to 100,000 deep;
- ``msgpack_ext``: msgpack extension types (the timestamp type -1 included) in fields;
- ``empty``: zero bytes;
- ``wrong_kind``: a valid message of another kind.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

import msgpack

CATEGORIES: dict[str, float] = {
    "random_bytes": 14,
    "mutated_msgpack": 16,
    "mutated_json": 16,
    "lone_surrogates": 10,
    "nan": 10,
    "huge": 0.1,
    "deep_nesting": 5,
    "msgpack_ext": 10,
    "empty": 2,
    "wrong_kind": 8,
}
KINDS = (
    "sensor",
    "chunk",
    "prediction",
    "confirmation",
    "status",
    "command",
    "device_command",
    "manifest",
)
MSGPACK_KINDS = ("sensor", "chunk")
MAX_PACKET = 1024 * 1024  # deploy/mosquitto/mosquitto.conf max_packet_size
LABELS = ("Walking", "Sitting", "Laying")


class Fuzzer:
    def __init__(self, seed: int, device_id: str = "fuzz-0", version: str = "v0002") -> None:
        self.rng = random.Random(seed)
        self.device_id = device_id
        self.version = version
        self._names = list(CATEGORIES)
        self._weights = [CATEGORIES[name] for name in self._names]
        self._makers: dict[str, Callable[[str], bytes]] = {
            "random_bytes": self._random_bytes,
            "mutated_msgpack": self._mutated_msgpack,
            "mutated_json": self._mutated_json,
            "lone_surrogates": self._lone_surrogates,
            "nan": self._nan,
            "huge": self._huge,
            "deep_nesting": self._deep,
            "msgpack_ext": self._ext,
            "empty": lambda kind: b"",
            "wrong_kind": self._wrong_kind,
        }

    def payload(self, kind: str, device_id: str | None = None) -> tuple[str, bytes]:
        if device_id is not None:
            self.device_id = device_id
        category = self.rng.choices(self._names, self._weights)[0]
        return category, self._makers[category](kind)

    # ------------------------------------------------------------------ valid documents
    def doc(self, kind: str) -> dict[str, Any]:
        """A valid message of ``kind`` as a document (what the encoder would serialise)."""
        rng = self.rng
        ts = 1.7e9 + rng.random() * 1e6
        pid = f"{rng.getrandbits(64):016x}"
        if kind == "sensor":
            n = rng.randint(1, 40)
            xyz = struct.pack(f"<{3 * n}f", *(rng.uniform(-20, 20) for _ in range(3 * n)))
            return {
                "v": 1,
                "dev": self.device_id,
                "seq": rng.randint(0, 2**40),
                "hz": 20.0,
                "t0": int(ts * 1e9),
                "xyz": xyz,
            }
        if kind == "chunk":
            return {"v": 1, "ver": self.version, "i": rng.randint(0, 3), "n": 4,
                    "data": rng.randbytes(rng.randint(0, 256))}  # fmt: skip
        if kind == "prediction":
            return {
                "type": "prediction", "v": 1, "prediction_id": pid, "device_id": self.device_id,
                "window": {"batch_seq": rng.randint(0, 2**40), "offset": 0, "length": 16},
                "label": "Walking", "class_index": 0, "probabilities": [0.8, 0.1, 0.1],
                "model_version": self.version, "ts": ts,
            }  # fmt: skip
        if kind == "confirmation":
            return {"type": "confirmation", "v": 1, "prediction_id": pid,
                    "label": rng.choice(LABELS), "source": "user", "ts": ts}  # fmt: skip
        if kind == "status":
            return {"type": "status", "v": 1, "device_id": self.device_id,
                    "state": rng.choice(("online", "offline")), "model_version": self.version,
                    "counters": {"predictions": rng.randint(0, 10**6)}, "ts": ts}  # fmt: skip
        if kind == "command":
            return {"type": "command", "v": 1, "command": "retrain", "request_id": pid, "ts": ts}
        if kind == "device_command":
            return {"type": "device_command", "v": 1, "command": "forget", "request_id": pid,
                    "ts": ts}  # fmt: skip
        if kind == "manifest":
            return {
                "type": "model_manifest", "v": 1, "version": self.version, "parent": "v0001",
                "sha256": f"{rng.getrandbits(256):064x}", "size": rng.randint(1, 10**6),
                "chunks": rng.randint(1, 8), "labels": list(LABELS),
                "input": {"window": 16, "channels": 3, "sample_rate_hz": 20.0,
                          "dtype": "float32"},
                "metrics": {"accuracy": 0.9}, "created": ts, "key_id": "k",
                "signature": "A" * 88,
            }  # fmt: skip
        raise ValueError(kind)

    def valid(self, kind: str) -> bytes:
        doc = self.doc(kind)
        if kind in MSGPACK_KINDS:
            return bytes(msgpack.packb(doc, use_bin_type=True))
        return json.dumps(doc, separators=(",", ":")).encode()

    # ------------------------------------------------------------------ categories
    def _random_bytes(self, kind: str) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, 512))

    def _mutate_doc(self, doc: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng
        key = rng.choice(list(doc))
        choice = rng.randrange(6)
        if choice == 0:
            del doc[key]
        elif choice == 1:
            doc[key] = rng.choice([None, True, -1, 2**63, -(2**63), 1.5, "", "x" * 300, [], {}])
        elif choice == 2:
            doc[f"extra{rng.randrange(100)}"] = rng.randbytes(8).hex()
        elif choice == 3:
            doc[key] = [doc[key]] * rng.randint(1, 3)
        elif choice == 4:
            doc["v"] = rng.choice([0, 2, "1", 1.0, None, True])
        else:
            doc[key] = {"nested": doc[key]} if not isinstance(doc[key], bytes) else doc[key][:-1]
        return doc

    def _mutate_bytes(self, data: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if not buf:
                break
            op = rng.randrange(4)
            at = rng.randrange(len(buf))
            if op == 0:
                buf[at] ^= 1 << rng.randrange(8)
            elif op == 1:
                del buf[at:]
            elif op == 2:
                buf[at:at] = rng.randbytes(rng.randint(1, 8))
            else:
                buf[at] = rng.choice((0x00, 0xFF, 0xC1, 0xDD, 0xDF, 0x7F))
        return bytes(buf)

    def _mutated_msgpack(self, kind: str) -> bytes:
        doc = self.doc(kind)
        if self.rng.random() < 0.5:
            doc = self._mutate_doc(doc)
            return bytes(msgpack.packb(doc, use_bin_type=True))
        return self._mutate_bytes(bytes(msgpack.packb(doc, use_bin_type=True)))

    def _mutated_json(self, kind: str) -> bytes:
        doc = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in self.doc(kind).items()}
        if self.rng.random() < 0.5:
            return json.dumps(self._mutate_doc(doc)).encode()
        return self._mutate_bytes(json.dumps(doc).encode())

    def _text_key(self, doc: dict[str, Any]) -> str:
        keys = [k for k, v in doc.items() if isinstance(v, str)]
        return self.rng.choice(keys) if keys else "dev"

    def _lone_surrogates(self, kind: str) -> bytes:
        rng = self.rng
        doc = self.doc(kind)
        key = self._text_key(doc)
        surrogate = chr(rng.choice((0xD800, 0xDBFF, 0xDC00, 0xDFFF)))
        doc[key] = f"{doc.get(key, '')}{surrogate}"[: rng.randint(1, 64)] + surrogate
        if kind in MSGPACK_KINDS:
            return bytes(msgpack.packb(doc, use_bin_type=True, unicode_errors="surrogatepass"))
        if rng.random() < 0.5:
            return json.dumps(doc, ensure_ascii=True).encode()  # "\ud800": valid JSON text
        return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")  # ED A0 80

    def _nan(self, kind: str) -> bytes:
        rng = self.rng
        doc = self.doc(kind)
        numeric = [k for k, v in doc.items() if isinstance(v, (int, float)) and k != "v"]
        key = rng.choice(numeric or ["ts"])
        literal = rng.choice(("NaN", "Infinity", "-Infinity", "1e999", "-1e999"))
        if kind in MSGPACK_KINDS:
            doc[key] = float(literal.replace("1e999", "inf").replace("Infinity", "inf"))
            return bytes(msgpack.packb(doc, use_bin_type=True))
        if "probabilities" in doc and rng.random() < 0.5:
            doc["probabilities"] = [float("nan"), 0.5, 0.5]
            return json.dumps(doc).encode()  # Python writes NaN
        doc[key] = "@@NUMBER@@"
        return json.dumps(doc).encode().replace(b'"@@NUMBER@@"', literal.encode())

    def _huge(self, kind: str) -> bytes:
        rng = self.rng
        size = rng.randint(64 * 1024, MAX_PACKET - 16 * 1024)
        doc = self.doc(kind)
        if kind in MSGPACK_KINDS:
            doc["xyz" if kind == "sensor" else "data"] = rng.randbytes(12) * (size // 12)
            return bytes(msgpack.packb(doc, use_bin_type=True))
        doc[self._text_key(doc)] = "A" * size
        return json.dumps(doc).encode()

    def _deep(self, kind: str) -> bytes:
        rng = self.rng
        depth = rng.choice((1000, 1000, 5000, 20_000, 100_000))
        if kind in MSGPACK_KINDS or rng.random() < 0.3:
            inner = b"\x91" * depth + b"\xc0"  # fixarray of 1, nested
            return b"\x81\xa1v" + inner if rng.random() < 0.5 else inner
        if rng.random() < 0.5:
            return b"[" * depth + b"]" * depth
        return b'{"type":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"

    def _ext(self, kind: str) -> bytes:
        rng = self.rng
        doc = self.doc(kind)
        key = rng.choice(list(doc))
        code = rng.choice((-1, 0, 1, 5, 127, -128))
        data = rng.randbytes(rng.choice((0, 1, 4, 8, 12, 16, 100)))
        if code >= 0:
            doc[key] = msgpack.ExtType(code, data)
            return bytes(msgpack.packb(doc, use_bin_type=True))
        # Negative (reserved) types, the timestamp -1 among them: msgpack-python will not make
        # them from ExtType, so an ext 8 is spliced in by hand where a marker string was packed.
        doc[key] = "@@EXT@@"
        ext = b"\xc7" + bytes([len(data)]) + struct.pack("b", code) + data
        return bytes(msgpack.packb(doc, use_bin_type=True)).replace(b"\xa7@@EXT@@", ext)

    def _wrong_kind(self, kind: str) -> bytes:
        return self.valid(self.rng.choice([k for k in KINDS if k != kind]))
