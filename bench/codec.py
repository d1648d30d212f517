"""Sensor batch codec cost: our msgpack format against the obvious JSON, side by side in one run.

For a 1 s batch (20 samples at 20 Hz) and a 10 s batch (200 samples), measures encode and decode
throughput (messages/s and payload MB/s) and the bytes per sample on the wire, for:

- ``msgpack``: ``shared.codec`` (samples as raw little-endian float32 bytes);
- ``json``: the same fields as a JSON object, samples as lists of floats (what a dashboard
  author would write first; float32 values printed exactly, as Python prints them);
- ``json_3dp``: the same, rounded to 3 decimals (mm/s^2, lossy) -- the smallest honest JSON.

Decoding includes building the ``SensorBatch`` (validation included) in every format, so the
comparison is of what a receiver pays. Each figure is the median of several rounds. Prints one
JSON document; the goal it records is at most 13 bytes per sample for a 10 s msgpack batch.

    python bench/codec.py [--rounds 7] [--min-round-s 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import REPO  # noqa: F401 - puts the repository on sys.path

from shared import codec
from shared.messages import SensorBatch

GOAL_BYTES_PER_SAMPLE_10S = 13.0
SAMPLE_RATE_HZ = 20.0


def make_batch(n_samples: int, seed: int = 0) -> SensorBatch:
    """A realistic wrist batch: gravity on one axis plus movement, as float32 m/s^2."""
    rng = np.random.default_rng(seed)
    samples = rng.normal(0.0, 3.0, size=(n_samples, 3)) + np.array([0.0, 9.81, 0.0])
    return SensorBatch(
        device_id="wrist-0001",
        seq=123_456,
        sample_rate_hz=SAMPLE_RATE_HZ,
        t0_ns=1_763_769_600_000_000_000,
        samples=samples.astype(np.float32),
    )


def _json_doc(batch: SensorBatch, decimals: int | None) -> dict[str, Any]:
    values = batch.samples.tolist()
    if decimals is not None:
        values = [[round(v, decimals) for v in row] for row in values]
    return {
        "type": "sensor_batch",
        "v": batch.v,
        "device_id": batch.device_id,
        "seq": batch.seq,
        "sample_rate_hz": batch.sample_rate_hz,
        "t0_ns": batch.t0_ns,
        "samples": values,
    }


def json_encoder(decimals: int | None) -> Callable[[SensorBatch], bytes]:
    def encode(batch: SensorBatch) -> bytes:
        return json.dumps(_json_doc(batch, decimals), separators=(",", ":")).encode()

    return encode


def json_decode(payload: bytes) -> SensorBatch:
    doc = json.loads(payload)
    return SensorBatch(
        device_id=doc["device_id"],
        seq=doc["seq"],
        sample_rate_hz=doc["sample_rate_hz"],
        t0_ns=doc["t0_ns"],
        samples=np.asarray(doc["samples"], dtype=np.float32),
    )


FORMATS: dict[str, tuple[Callable[[SensorBatch], bytes], Callable[[bytes], SensorBatch]]] = {
    "msgpack": (codec.encode_sensor_batch, codec.decode_sensor_batch),
    "json": (json_encoder(None), json_decode),
    "json_3dp": (json_encoder(3), json_decode),
}


def _calibrate(call: Callable[[], object], min_round_s: float) -> int:
    """Iterations per round so that one round takes about ``min_round_s``."""
    iterations = 1
    while True:
        started = time.perf_counter()
        for _ in range(iterations):
            call()
        elapsed = time.perf_counter() - started
        if elapsed >= min_round_s / 4:
            return max(1, int(iterations * min_round_s / elapsed))
        iterations *= 4


def _rate(call: Callable[[], object], rounds: int, min_round_s: float) -> float:
    """Median calls per second over ``rounds`` rounds."""
    iterations = _calibrate(call, min_round_s)
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(iterations):
            call()
        rates.append(iterations / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(batch: SensorBatch, rounds: int, min_round_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (encode, decode) in FORMATS.items():
        payload = encode(batch)
        decoded = decode(payload)
        if name != "json_3dp":  # lossless formats must round-trip exactly
            assert decoded == batch, f"{name} does not round-trip"
        encode_rate = _rate(lambda e=encode: e(batch), rounds, min_round_s)  # type: ignore[misc]
        decode_rate = _rate(lambda d=decode, p=payload: d(p), rounds, min_round_s)  # type: ignore[misc]
        size = len(payload)
        results[name] = {
            "bytes": size,
            "bytes_per_sample": round(size / batch.n_samples, 2),
            "encode_msgs_per_s": round(encode_rate),
            "encode_mb_per_s": round(encode_rate * size / 1e6, 1),
            "decode_msgs_per_s": round(decode_rate),
            "decode_mb_per_s": round(decode_rate * size / 1e6, 1),
        }
    mine = results["msgpack"]
    for other in ("json", "json_3dp"):
        theirs = results[other]
        results[f"msgpack_vs_{other}"] = {
            "size_ratio": round(mine["bytes"] / theirs["bytes"], 3),
            "encode_speedup": round(mine["encode_msgs_per_s"] / theirs["encode_msgs_per_s"], 2),
            "decode_speedup": round(mine["decode_msgs_per_s"] / theirs["decode_msgs_per_s"], 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure (median)")
    parser.add_argument(
        "--min-round-s", type=float, default=0.2, help="approximate seconds per round"
    )
    args = parser.parse_args()

    report: dict[str, Any] = {
        "benchmark": "sensor batch codec",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        # Throughput on a shared machine moves with its load: read the figures next to this.
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "rounds": args.rounds,
        "statistic": "median over rounds",
        "batches": {},
    }
    for label, n_samples in (("1s_20_samples", 20), ("10s_200_samples", 200)):
        report["batches"][label] = measure(make_batch(n_samples), args.rounds, args.min_round_s)
    actual = report["batches"]["10s_200_samples"]["msgpack"]["bytes_per_sample"]
    report["goal"] = {
        "what": "msgpack bytes per sample on the wire, 10 s batch",
        "max": GOAL_BYTES_PER_SAMPLE_10S,
        "actual": actual,
        "met": actual <= GOAL_BYTES_PER_SAMPLE_10S,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
