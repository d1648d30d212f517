"""Streaming reader for the WISDM v1.1 raw accelerometer format, and its verified download.

The format is ``user,activity,timestamp,x,y,z;``. The real ``WISDM_ar_v1.1_raw.txt`` has quirks a
reader must survive: several records on one physical line, a trailing ``;``, missing or empty
values, timestamps equal to 0, duplicated rows and activity names in mixed case. Bad records are
skipped and counted, with their line numbers, in a :class:`LoadReport`; nothing crashes and
nothing is silently misparsed.

Parsing is vectorised with numpy over chunks of a few MB: separators and commas are located on
the raw bytes, fields are gathered into fixed-width byte strings and converted in one call. A
Python loop runs only over the (rare) records that fail conversion, to name the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt

from shared.errors import DataError
from shared.fileio import replacing

logger = logging.getLogger(__name__)

WISDM_ARCHIVE_URL: Final = (
    "https://www.cis.fordham.edu/wisdm/includes/datasets/latest/WISDM_ar_latest.tar.gz"
)
# The lab publishes no checksum for the archive and none could be found in public sources, so
# the expected sha256 must be given by whoever downloads (see docs/model.md, "Data").
WISDM_ARCHIVE_SHA256: Final[str | None] = None
WISDM_RAW_MEMBER: Final = "WISDM_ar_v1.1_raw.txt"

# The activity names of WISDM v1.1, in the order of the lab's documentation. Labels found in a
# file follow this order; others (e.g. HAPT's Laying) come after, alphabetically.
WISDM_ACTIVITIES: Final = ("Walking", "Jogging", "Upstairs", "Downstairs", "Sitting", "Standing")

_CHUNK_BYTES: Final = 4 << 20
_MAX_FIELD_BYTES: Final = 40
_KEEP_BAD_LINES: Final = 100
_N_FIELDS: Final = 6
_SEMICOLON, _NEWLINE, _COMMA, _CR = ord(";"), ord("\n"), ord(","), ord("\r")

# Spellings seen in HAR data sets that mean one of our activity names.
_ACTIVITY_SYNONYMS: Final = MappingProxyType(
    {
        "walkingupstairs": "Upstairs",
        "walkingdownstairs": "Downstairs",
        "upstairs": "Upstairs",
        "downstairs": "Downstairs",
        "lying": "Laying",
        "laying": "Laying",
    }
)


def normalise_activity(name: str) -> str:
    """Canonical spelling of an activity name: ``"WALKING"`` and ``" walking"`` -> ``"Walking"``."""
    cleaned = name.strip()
    key = "".join(ch for ch in cleaned.lower() if ch.isalnum())
    if key in _ACTIVITY_SYNONYMS:
        return _ACTIVITY_SYNONYMS[key]
    for known in WISDM_ACTIVITIES:
        if key == known.lower():
            return known
    return cleaned[:1].upper() + cleaned[1:].lower()


def order_labels(names: set[str] | frozenset[str]) -> tuple[str, ...]:
    """WISDM's six in their documented order first, then any other names alphabetically."""
    known = [name for name in WISDM_ACTIVITIES if name in names]
    return tuple(known + sorted(names - set(WISDM_ACTIVITIES)))


@dataclass
class LoadReport:
    """What a load kept and what it skipped, and why."""

    source: str
    records_seen: int = 0
    records_kept: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    # (line number, reason) of the first bad records, for a person to look at.
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    physical_lines: int = 0

    def skip(self, line: int, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.bad_lines) < _KEEP_BAD_LINES:
            self.bad_lines.append((line, reason))

    @property
    def records_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "physical_lines": self.physical_lines,
            "records_seen": self.records_seen,
            "records_kept": self.records_kept,
            "records_skipped": self.records_skipped,
            "duplicates_removed": self.duplicates,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "first_bad_lines": [
                {"line": line, "reason": why} for line, why in sorted(self.bad_lines)
            ],
        }


@dataclass(frozen=True)
class WisdmData:
    """Accelerometer samples in file order, with the labels found in the file."""

    users: npt.NDArray[np.int32]
    activity: npt.NDArray[np.int32]  # index into ``labels``
    timestamps: npt.NDArray[np.int64]
    xyz: npt.NDArray[np.float32]  # (n, 3), m/s^2 as recorded
    labels: tuple[str, ...]
    report: LoadReport

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.activity, minlength=len(self.labels))
        return {label: int(c) for label, c in zip(self.labels, counts, strict=True)}


@dataclass(frozen=True)
class _Chunk:
    users: npt.NDArray[np.int64]
    activity_names: npt.NDArray[np.bytes_]
    timestamps: npt.NDArray[np.int64]
    xyz: npt.NDArray[np.float64]
    lines: npt.NDArray[np.int64]


def _open_text_stream(path: Path) -> tuple[IO[bytes], list[IO[bytes]]]:
    """A binary stream of the raw text in a plain, gzip or (gzipped) tar file, and what to close."""
    try:
        with path.open("rb") as probe:
            magic = probe.read(2)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if tarfile.is_tarfile(path):
        return _open_tar_member(path)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb"), []  # type: ignore[return-value]
    return path.open("rb"), []


def _open_tar_member(path: Path) -> tuple[IO[bytes], list[IO[bytes]]]:
    try:
        archive = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the caller
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot open archive {path}: {exc}") from exc
    members = [m for m in archive.getmembers() if m.isfile()]
    chosen = [m for m in members if Path(m.name).name == WISDM_RAW_MEMBER] or [
        m for m in members if m.name.endswith("_raw.txt")
    ]
    if not chosen:
        archive.close()
        names = ", ".join(m.name for m in members[:10])
        raise DataError(f"{path} holds no *_raw.txt member (found: {names})")
    stream = archive.extractfile(chosen[0])
    if stream is None:  # pragma: no cover - isfile() members always extract
        archive.close()
        raise DataError(f"cannot extract {chosen[0].name} from {path}")
    return stream, [archive]  # type: ignore[list-item]


def _gather(
    buf: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]
) -> npt.NDArray[np.bytes_]:
    """Slices ``buf[start:end]`` as a fixed-width byte-string array (shorter ones nul-padded)."""
    width = max(int((ends - starts).max(initial=1)), 1)
    index = starts[:, None] + np.arange(width, dtype=np.int64)[None, :]
    inside = index < ends[:, None]
    gathered = np.where(inside, buf[np.minimum(index, buf.shape[0] - 1)], 0).astype(np.uint8)
    return np.ascontiguousarray(gathered).view(f"S{width}").reshape(-1)


def _convert(
    texts: npt.NDArray[np.bytes_], dtype: type[np.int64] | type[np.float64]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Converted values and a mask of those that converted; the slow path runs only on failure."""
    try:
        return texts.astype(dtype), np.ones(texts.shape[0], dtype=bool)
    except ValueError:
        pass
    values = np.zeros(texts.shape[0], dtype=dtype)
    ok = np.zeros(texts.shape[0], dtype=bool)
    for i, text in enumerate(texts.tolist()):
        try:
            values[i] = int(text) if dtype is np.int64 else float(text)
            ok[i] = True
        except (ValueError, OverflowError):
            pass
    return values, ok


def _field_bounds(
    buf: npt.NDArray[np.uint8],
    blank: npt.NDArray[np.bool_],
    *,
    rec_start: npt.NDArray[np.int64],
    rec_end: npt.NDArray[np.int64],
    rec_line: npt.NDArray[np.int64],
    report: LoadReport,
) -> tuple[list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]], npt.NDArray[np.bool_]]:
    """(start, end) of each of the six fields of records with five commas, blanks stripped."""
    comma_pos = np.flatnonzero(buf == _COMMA)  # cheap next to the parse; keeps the API small
    first_comma = np.searchsorted(comma_pos, rec_start)
    # Field k runs from just after comma k-1 (or the record start) to comma k (or the record end).
    bounds = [rec_start]
    bounds += [comma_pos[first_comma + k] for k in range(_N_FIELDS - 1)]
    starts = [bounds[0]] + [b + 1 for b in bounds[1:]]
    ends = [*bounds[1:], rec_end]
    fields = []
    valid = np.ones(rec_start.shape[0], dtype=bool)
    for k in range(_N_FIELDS):
        # Strip blanks at both ends, so " 1.5\r" and "1.5" read the same.
        lo, hi = starts[k].copy(), ends[k].copy()
        for _ in range(4):
            at_blank = (lo < hi) & blank[np.minimum(lo, buf.shape[0] - 1)]
            lo = lo + at_blank
            at_blank_end = (hi > lo) & blank[np.maximum(hi - 1, 0)]
            hi = hi - at_blank_end
        empty = hi <= lo
        too_long = (hi - lo) > _MAX_FIELD_BYTES
        for line in rec_line[valid & empty].tolist():
            report.skip(line, "empty value")
        for line in rec_line[valid & too_long & ~empty].tolist():
            report.skip(line, "value too long")
        valid &= ~empty & ~too_long
        fields.append((lo, hi))

    return fields, valid


def _parse_chunk(data: bytes, first_line: int, report: LoadReport) -> _Chunk:
    """Parses whole records in ``data``; ``first_line`` is the physical line ``data`` starts on."""
    buf = np.frombuffer(data, dtype=np.uint8)
    is_newline = buf == _NEWLINE
    newline_pos = np.flatnonzero(is_newline)
    sep_pos = np.flatnonzero(is_newline | (buf == _SEMICOLON) | (buf == _CR))
    rec_start = np.concatenate(([0], sep_pos + 1)).astype(np.int64)
    rec_end = np.concatenate((sep_pos, [buf.shape[0]])).astype(np.int64)
    comma_pos = np.flatnonzero(buf == _COMMA)
    n_commas = np.searchsorted(comma_pos, rec_end) - np.searchsorted(comma_pos, rec_start)

    # Nothing between two separators (";\n", blank lines, "\r\n") is not a record; neither is
    # a run of blanks (rare, so checked one by one).
    has_content = rec_end > rec_start
    for i in np.flatnonzero(has_content & (n_commas == 0) & (rec_end - rec_start < 16)):
        has_content[i] = bool(data[rec_start[i] : rec_end[i]].strip())
    rec_start, rec_end, n_commas = (
        rec_start[has_content],
        rec_end[has_content],
        n_commas[has_content],
    )
    rec_line = first_line + np.searchsorted(newline_pos, rec_start)
    report.records_seen += int(rec_start.shape[0])

    good_count = n_commas == _N_FIELDS - 1
    for line in rec_line[(n_commas < _N_FIELDS - 1)].tolist():
        report.skip(line, "missing fields")
    for line in rec_line[(n_commas > _N_FIELDS - 1)].tolist():
        report.skip(line, "too many fields")
    rec_start, rec_end, rec_line = rec_start[good_count], rec_end[good_count], rec_line[good_count]
    blank = (buf == ord(" ")) | (buf == ord("\t"))

    fields, valid = _field_bounds(
        buf, blank, rec_start=rec_start, rec_end=rec_end, rec_line=rec_line, report=report
    )
    keep = np.flatnonzero(valid)
    texts = [_gather(buf, lo[keep], hi[keep]) for lo, hi in fields]
    users, ok_user = _convert(texts[0], np.int64)
    timestamps, ok_ts = _convert(texts[2], np.int64)
    xyz_columns = [_convert(texts[k], np.float64) for k in (3, 4, 5)]
    xyz: npt.NDArray[np.float64] = np.stack([c[0] for c in xyz_columns], axis=1)
    ok_xyz = np.logical_and.reduce([c[1] for c in xyz_columns])
    lines = rec_line[keep]

    checks: list[tuple[npt.NDArray[np.bool_], str]] = [
        (ok_user, "user is not an integer"),
        (ok_ts, "timestamp is not an integer"),
        (ok_xyz, "acceleration is not a number"),
        (np.asarray(np.isfinite(xyz).all(axis=1)), "acceleration is not finite"),
        (users >= 0, "negative user id"),
        (timestamps != 0, "zero timestamp"),
        (timestamps > 0, "negative timestamp"),
    ]
    accepted = np.ones(keep.shape[0], dtype=bool)
    for ok, reason in checks:
        for line in lines[accepted & ~ok].tolist():
            report.skip(line, reason)
        accepted &= ok
    return _Chunk(
        users=users[accepted].astype(np.int64),
        activity_names=texts[1][accepted],
        timestamps=timestamps[accepted].astype(np.int64),
        xyz=xyz[accepted],
        lines=lines[accepted],
    )


def _iter_chunks(stream: IO[bytes], report: LoadReport) -> Iterator[_Chunk]:
    carry = b""
    line = 1
    ends_with_newline = True  # an empty file has no line
    while True:
        block = stream.read(_CHUNK_BYTES)
        if not block:
            if carry.strip():
                yield _parse_chunk(carry, line, report)
            line += carry.count(b"\n")
            report.physical_lines = line - 1 + (0 if ends_with_newline else 1)
            return
        ends_with_newline = block.endswith(b"\n")
        data = carry + block
        # Cut after the last separator so no record is split across chunks (a file with no
        # newline at all still streams, cut at ";").
        cut = max(data.rfind(b"\n"), data.rfind(b";")) + 1
        if cut == 0:
            carry = data
            continue
        whole, carry = data[:cut], data[cut:]
        yield _parse_chunk(whole, line, report)
        line += whole.count(b"\n")


def load_wisdm(path: Path | str, *, deduplicate: bool = True) -> WisdmData:
    """Reads a WISDM-format file (plain, ``.gz`` or the official ``.tar.gz``) into arrays.

    Raises :class:`DataError` if the file cannot be read or holds no valid record; bad records
    are skipped and described in ``WisdmData.report``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    report = LoadReport(source=str(path))
    stream, to_close = _open_text_stream(path)
    try:
        chunks = list(_iter_chunks(stream, report))
    except (OSError, EOFError, tarfile.TarError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    finally:
        stream.close()
        for item in to_close:
            item.close()

    users = np.concatenate([c.users for c in chunks]) if chunks else np.zeros(0, np.int64)
    if users.shape[0] == 0:
        raise DataError(f"{path} holds no valid WISDM record ({report.records_skipped} skipped)")
    timestamps = np.concatenate([c.timestamps for c in chunks])
    xyz = np.concatenate([c.xyz for c in chunks])
    # Names are mapped once per distinct spelling per chunk; runs keep the sort small.
    per_chunk = [_distinct_names(c) for c in chunks]
    labels = order_labels(frozenset(name for names, _ in per_chunk for name in names))
    activity = np.concatenate(
        [
            np.asarray([labels.index(name) for name in names], dtype=np.int32)[codes]
            for names, codes in per_chunk
        ]
    )

    if deduplicate:
        keep = _first_of_duplicates(users, activity, timestamps, xyz)
        report.duplicates = int(users.shape[0] - keep.shape[0])
        users, activity, timestamps, xyz = users[keep], activity[keep], timestamps[keep], xyz[keep]
    report.records_kept = int(users.shape[0])
    if report.records_skipped or report.duplicates:
        logger.info(
            "%s: kept %d records, skipped %d (%s), removed %d duplicates",
            path,
            report.records_kept,
            report.records_skipped,
            dict(report.skipped),
            report.duplicates,
        )
    return WisdmData(
        users=users.astype(np.int32),
        activity=activity.astype(np.int32),
        timestamps=timestamps,
        xyz=xyz.astype(np.float32),
        labels=labels,
        report=report,
    )


def _distinct_names(chunk: _Chunk) -> tuple[list[str], npt.NDArray[np.intp]]:
    """Canonical names of the distinct spellings in a chunk, and each record's index into them."""
    names = chunk.activity_names
    if names.shape[0] == 0:
        return [], np.zeros(0, dtype=np.intp)
    starts = np.concatenate(([0], np.flatnonzero(names[1:] != names[:-1]) + 1))
    lengths = np.diff(np.concatenate((starts, [names.shape[0]])))
    spellings, run_index = np.unique(names[starts], return_inverse=True)
    canonical = [normalise_activity(bytes(raw).decode("utf-8", "replace")) for raw in spellings]
    distinct = sorted(set(canonical))
    spelling_code = np.asarray([distinct.index(name) for name in canonical], dtype=np.intp)
    return distinct, np.repeat(spelling_code[run_index.reshape(-1)], lengths.astype(np.intp))


def _first_of_duplicates(
    users: npt.NDArray[np.int64],
    activity: npt.NDArray[np.int32],
    timestamps: npt.NDArray[np.int64],
    xyz: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    """Indices of rows that are not an exact repeat of an earlier row, in file order.

    Rows are sorted by a 64-bit hash (much faster than sorting whole rows) and only neighbours
    with equal hashes are compared in full, so a hash collision can at worst keep a duplicate,
    never drop a distinct row.
    """
    rows = np.empty((users.shape[0], 6), dtype=np.int64)
    rows[:, 0] = users
    rows[:, 1] = activity
    rows[:, 2] = timestamps
    rows[:, 3:] = xyz.view(np.int64)  # compare the bits: exact duplicates only
    mixed = rows.view(np.uint64) * np.array(
        [
            0x9E3779B97F4A7C15,
            0xC2B2AE3D27D4EB4F,
            0x165667B19E3779F9,
            0xD6E8FEB86659FD93,
            0xFF51AFD7ED558CCD,
            0xC4CEB9FE1A85EC53,
        ],
        dtype=np.uint64,
    )
    hashes = np.bitwise_xor.reduce(mixed ^ (mixed >> np.uint64(29)), axis=1)
    order = np.argsort(hashes, kind="stable")
    sorted_rows = rows[order]
    repeat = np.zeros(rows.shape[0], dtype=bool)
    repeat[1:] = (hashes[order][1:] == hashes[order][:-1]) & (
        sorted_rows[1:] == sorted_rows[:-1]
    ).all(axis=1)
    # Stable sort: within a run of identical rows the first in file order comes first.
    return np.sort(order[~repeat]).astype(np.int64)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wisdm(
    url: str = WISDM_ARCHIVE_URL,
    dest: Path | str = Path("WISDM_ar_latest.tar.gz"),
    sha256: str | None = WISDM_ARCHIVE_SHA256,
    timeout: float = 60.0,
    *,
    allow_unverified: bool = False,
) -> Path:
    """Downloads ``url`` to ``dest`` atomically and checks its sha256.

    The file is written to a temporary name beside ``dest``, verified, fsynced and renamed, so
    ``dest`` is either absent or complete and verified. Without an expected ``sha256`` the
    download is refused unless ``allow_unverified`` is set (then the digest is logged, so it can
    be pinned next time). Raises :class:`DataError` with the reason on any failure.
    """
    dest = Path(dest)
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and (
        len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)
    ):
        raise DataError(f"expected sha256 must be 64 hex digits, got {sha256!r}")
    if expected is None and not allow_unverified:
        raise DataError(
            "no sha256 given for the download: the WISDM lab publishes none, so pass the digest "
            "you trust (--sha256), or explicitly allow an unverified download to learn it"
        )
    digest = hashlib.sha256()
    size = 0
    with replacing(dest, suffix=".part") as tmp:
        with tmp.open("wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                    while block := response.read(1 << 16):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
            except urllib.error.HTTPError as exc:
                raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DataError(f"download of {url} failed: {reason}") from exc
        actual = digest.hexdigest()
        _check_digest(url, expected, actual, size)
        if expected is None:
            logger.warning("downloaded %s unverified: sha256 %s (%d bytes)", url, actual, size)
    logger.info("downloaded %s to %s (%d bytes, sha256 %s)", url, dest, size, actual)
    return dest


def _check_digest(url: str, expected: str | None, actual: str, size: int) -> None:
    if expected is not None and actual != expected:
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual} "
            f"({size} bytes); the file was not kept"
        )
