"""The fleet view as lines of text for a screen of a given size. Pure: no curses, no clock.

Layout: a title line and the column headings, one row per device (the selected one marked with
``>``, scrolled so that it stays visible), then the footer: accuracy per model version, the
selected device's details, the last bad payload if any, the keys and the status line.
"""

from __future__ import annotations

from dataclasses import dataclass

from dashboard.controller import MAX_LABEL_KEYS
from dashboard.fleet_view import Accuracy, DeviceRow, FleetView, ViewCounts

_DEVICE_WIDTH = (6, 24)  # the device column fits the longest id within these bounds


@dataclass(frozen=True, slots=True)
class Frame:
    """What the screen shows besides the fleet view."""

    topic_root: str
    connection: str  # e.g. "connected to 127.0.0.1:1883"
    selected: str | None
    status: str
    interactive: bool = True  # False for a printed snapshot: no selection, keys or status


def render(
    view: FleetView, frame: Frame, *, width: int, height: int | None, now: float
) -> list[str]:
    """The screen's lines, none longer than ``width``, at most ``height`` (None: every row)."""
    view.expire_pending(now)  # the screen shows the view as of now
    rows = view.rows()
    device_width = min(
        max([_DEVICE_WIDTH[0], *(len(row.device_id) for row in rows)]), _DEVICE_WIDTH[1]
    )
    counts = view.counts()
    header = [_title(view, frame, rows, counts), _headings(device_width)]
    footer = _footer(view, frame, counts, now, width)
    table = [_row(row, row.device_id == frame.selected, device_width, now) for row in rows]
    if not table:
        table = ["  (no devices yet: waiting for their status and predictions)"]
    if height is not None:
        table = _scrolled(table, rows, frame.selected, max(0, height - len(header) - len(footer)))
    lines = [*header, *table, *footer]
    if height is not None:
        lines = lines[: max(0, height)]
    return [line[: max(0, width)] for line in lines]


def format_age(seconds: float | None) -> str:
    """A short age: 4s, 12m, 3h, 2d; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_accuracy(version: str, accuracy: Accuracy) -> str:
    ratio = accuracy.ratio
    percent = f"{ratio * 100:.0f}%" if ratio is not None else "-"
    return f"{version} {accuracy.right}/{accuracy.confirmed} {percent}"


def _fit(text: str, width: int) -> str:
    """``text`` padded or cut to exactly ``width`` characters (a cut ends in '~')."""
    if len(text) > width:
        return text[: width - 1] + "~"
    return text.ljust(width)


def _title(view: FleetView, frame: Frame, rows: list[DeviceRow], counts: ViewCounts) -> str:
    model = view.model
    model_text = f"model {model.version} ({len(model.labels)} labels)" if model else "no model"
    online = sum(row.presence == "online" for row in rows)
    # What matters most first: at 80 columns the end of the line is cut.
    return (
        f"HAR fleet  devices {len(rows)} ({online} online)  {model_text}  "
        f"bad payloads {counts.bad_payloads}  {frame.topic_root}  {frame.connection}"
    )


def _headings(device_width: int) -> str:
    return (
        f"  {_fit('DEVICE', device_width)} {_fit('STATE', 7)} {_fit('ACTIVITY', 14)} "
        f"{'CONF':>5} {_fit('MODEL', 12)} {'AGE':>5} {'ERR':>4}"
    )


def _row(row: DeviceRow, selected: bool, device_width: int, now: float) -> str:
    latest = row.latest
    activity = latest.label if latest else "-"
    confidence = f"{latest.confidence * 100:.0f}%" if latest else "-"
    age = format_age(now - latest.received_at if latest else None)
    return (
        f"{'>' if selected else ' '} {_fit(row.device_id, device_width)} "
        f"{_fit(row.presence, 7)} {_fit(activity, 14)} {confidence:>5} "
        f"{_fit(row.model_version or '-', 12)} {age:>5} {row.errors:>4}"
    )


def _scrolled(
    table: list[str], rows: list[DeviceRow], selected: str | None, space: int
) -> list[str]:
    """At most ``space`` lines: a window of rows that holds the selected device, and a line
    saying how many rows are above or below it, so that none is hidden without a sign."""
    if len(table) <= space:
        return table
    if space < 3:
        return table[:space]
    ids = [row.device_id for row in rows]
    index = ids.index(selected) if selected in ids else 0
    visible = space - 1  # one line for a marker
    start = max(0, index - visible + 1)
    end = min(len(table), start + visible)
    if start > 0 and end < len(table):  # markers above and below
        visible -= 1
        start = max(0, index - visible + 1)
        end = start + visible
    window = table[start:end]
    if start > 0:
        window.insert(0, f"  ({start} more above)")
    if end < len(table):
        window.append(f"  ({len(table) - end} more below)")
    return window


def _footer(view: FleetView, frame: Frame, counts: ViewCounts, now: float, width: int) -> list[str]:
    accuracy = view.accuracy()
    pending = counts.confirmations_pending
    accuracy_text = (
        "  ".join(format_accuracy(version, acc) for version, acc in accuracy.items())
        if accuracy
        else "none confirmed yet"
    )
    unmatched = counts.confirmations_unmatched
    notes = [f"{pending} waiting for their prediction"] if pending else []
    if unmatched:
        notes.append(f"{unmatched} never matched a prediction")
    waiting = f"  ({', '.join(notes)})" if notes else ""
    lines = [f"accuracy of confirmed predictions: {accuracy_text}{waiting}"]
    if frame.interactive:
        lines.append(_details(view.row(frame.selected) if frame.selected else None, now))
    if view.last_bad_payload is not None:
        lines.append(f"last bad payload: {view.last_bad_payload}")
    if not frame.interactive:
        return lines
    labels = view.labels[:MAX_LABEL_KEYS]
    label_keys = (
        [f"{number} {label}" for number, label in enumerate(labels, start=1)]
        if labels
        else ["(labels unknown until the model manifest arrives)"]
    )
    keys = ["keys: up/down select ", "c confirm ", "correct to:", *label_keys, " q quit"]
    lines += _wrapped(keys, width)
    lines.append(f"status: {frame.status}")
    return lines


def _wrapped(words: list[str], width: int) -> list[str]:
    """``words`` joined by spaces into lines of at most ``width`` (continuations indented),
    never splitting a word: every key stays readable on a narrow screen."""
    lines = [words[0]]
    for word in words[1:]:
        joined = f"{lines[-1]} {word}"
        if len(joined.rstrip()) <= width:
            lines[-1] = joined
        else:
            lines.append(f"  {word.strip()}")
    return [line.rstrip() for line in lines]


def counted(count: int, noun: str) -> str:
    """``1 confirmation``, ``2 confirmations``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _details(row: DeviceRow | None, now: float) -> str:
    if row is None:
        return "selected: none"
    latest = row.latest
    if latest is None:
        text = f"{row.device_id}: no prediction yet"
    else:
        truth = f", truth {latest.truth}" if latest.truth else ""
        text = (
            f"{row.device_id}: prediction {latest.prediction_id} {latest.label} "
            f"{latest.confidence * 100:.0f}% by {latest.model_version}{truth}"
        )
    text += f"; {counted(row.predictions, 'prediction')}, "
    text += counted(row.confirmations, "confirmation")
    if row.last_error is not None:
        age = format_age(now - row.last_error.received_at)
        text += f"; last error {row.last_error.code} {age} ago: {row.last_error.message}"
    return text
