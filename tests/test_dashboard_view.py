"""The dashboard's pure parts: the fleet view, message feeding, rendering and the keys."""

from __future__ import annotations

import curses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.controller import (
    ConfirmAsPredicted,
    CorrectTo,
    Move,
    Quit,
    action_for_key,
)
from dashboard.feed import feed_message
from dashboard.fleet_view import Accuracy, FleetView, Limits
from dashboard.render import Frame, counted, format_age, render
from dashboard.settings import DashboardSettings
from shared import codec
from shared.config import load_settings
from shared.errors import ConfigError
from shared.messages import (
    Confirmation,
    DeviceStatus,
    ErrorEvent,
)
from shared.topics import Topics
from tests.dashboard_helpers import LABELS, T0, manifest, prediction

TOPICS = Topics("test/har/v1")


def confirmation(pid: str, label: str) -> Confirmation:
    return Confirmation(prediction_id=pid, label=label, source="user", ts=T0)


def status(device: str, state: str, version: str | None = "v1") -> DeviceStatus:
    return DeviceStatus(device_id=device, state=state, model_version=version, ts=T0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ fleet view


def test_latest_prediction_confidence_presence_and_version() -> None:
    view = FleetView()
    view.apply_status("wrist-1", status("wrist-1", "online", "v1"), now=T0)
    view.apply_prediction("wrist-1", prediction("p1", "Jogging", "v1"), now=T0 + 1)
    view.apply_prediction("wrist-1", prediction("p2", "Sitting", "v2"), now=T0 + 2)
    row = view.row("wrist-1")
    assert row is not None
    assert row.presence == "online"
    assert row.status_at == T0
    assert row.latest is not None
    assert (row.latest.prediction_id, row.latest.label) == ("p2", "Sitting")
    assert row.latest.confidence == pytest.approx(0.9)
    assert row.model_version == "v2"  # the prediction came after the status
    assert row.predictions == 2
    view.apply_status("wrist-1", status("wrist-1", "offline", "v2"), now=T0 + 3)
    row = view.row("wrist-1")
    assert row is not None
    assert row.presence == "offline"
    assert row.status_at == T0 + 3


def test_confirmation_after_its_prediction_counts_right_or_wrong_per_version() -> None:
    view = FleetView()
    view.apply_prediction("wrist-1", prediction("p1", "Walking", "v1"), now=T0)
    view.apply_prediction("wrist-1", prediction("p2", "Walking", "v1"), now=T0)
    view.apply_prediction("wrist-1", prediction("p3", "Sitting", "v2"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("p1", "Walking"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("p2", "Jogging"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("p3", "Sitting"), now=T0)
    assert view.accuracy() == {"v1": Accuracy(right=1, wrong=1), "v2": Accuracy(right=1)}
    assert view.accuracy()["v1"].ratio == 0.5
    assert view.counts().confirmations_joined == 3


def test_confirmation_before_its_prediction_waits_and_then_counts() -> None:
    view = FleetView()
    view.apply_confirmation("wrist-1", confirmation("p1", "Jogging"), now=T0)
    assert view.accuracy() == {}
    assert view.counts().confirmations_pending == 1
    view.apply_prediction("wrist-1", prediction("p1", "Walking", "v3"), now=T0)
    assert view.accuracy() == {"v3": Accuracy(right=0, wrong=1)}
    assert view.counts().confirmations_pending == 0


def test_first_confirmation_wins_and_a_prediction_counts_once() -> None:
    view = FleetView()
    # Before the prediction: the first waiting one wins.
    view.apply_confirmation("wrist-1", confirmation("p1", "Walking"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("p1", "Jogging"), now=T0)
    view.apply_prediction("wrist-1", prediction("p1", "Walking"), now=T0)
    # After it: later confirmations and a redelivered prediction change nothing.
    view.apply_confirmation("wrist-1", confirmation("p1", "Sitting"), now=T0)
    view.apply_prediction("wrist-1", prediction("p1", "Walking"), now=T0)
    assert view.accuracy() == {"v1": Accuracy(right=1)}
    counts = view.counts()
    assert counts.confirmations_duplicate == 2
    assert counts.predictions_duplicate == 1


def test_prediction_ids_are_joined_per_device() -> None:
    view = FleetView()
    view.apply_prediction("wrist-1", prediction("same", "Walking", device="wrist-1"), now=T0)
    view.apply_confirmation("wrist-2", confirmation("same", "Walking"), now=T0)
    assert view.accuracy() == {}
    assert view.counts().confirmations_pending == 1


def test_a_confirmation_stops_waiting_for_a_prediction_that_never_comes() -> None:
    view = FleetView(Limits(pending_s=60.0))
    view.apply_confirmation("wrist-1", confirmation("before-we-started", "Walking"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("late", "Walking"), now=T0 + 30)
    frame = Frame("har/v1", "connected", selected=None, status="", interactive=False)
    footer = render(view, frame, width=200, height=None, now=T0 + 59)[-3:]
    assert any("2 waiting for their prediction" in line for line in footer)
    footer = render(view, frame, width=200, height=None, now=T0 + 61)[-3:]
    assert any("1 waiting for their prediction, 1 never matched" in line for line in footer)
    counts = view.counts()
    assert counts.confirmations_pending == 1
    assert counts.confirmations_unmatched == 1
    # The one still waiting is joined when its prediction comes.
    view.apply_prediction("wrist-1", prediction("late", "Walking", device="wrist-1"), now=T0 + 62)
    assert view.accuracy() == {"v1": Accuracy(right=1)}


def test_never_matched_confirmations_are_dropped_at_the_bound() -> None:
    view = FleetView(Limits(pending_per_device=2))
    for index in range(5):
        view.apply_confirmation("wrist-1", confirmation(f"gone-{index}", "Walking"), now=T0)
    counts = view.counts()
    assert counts.confirmations_pending == 2
    assert counts.confirmations_dropped == 3


def test_quietest_device_makes_room_at_the_device_bound() -> None:
    view = FleetView(Limits(devices=2))
    view.apply_status("a", status("a", "online"), now=T0)
    view.apply_status("b", status("b", "online"), now=T0 + 1)
    view.apply_status("a", status("a", "online"), now=T0 + 2)
    view.apply_status("c", status("c", "online"), now=T0 + 3)
    assert [row.device_id for row in view.rows()] == ["a", "c"]
    assert view.counts().devices_evicted == 1


def test_manifest_gives_labels_and_snapshot_is_json() -> None:
    view = FleetView()
    assert view.labels == ()
    view.apply_manifest(manifest("v9"))
    view.apply_prediction("wrist-1", prediction("p1", "Walking", truth="Jogging"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("p1", "Jogging"), now=T0)
    snapshot = json.loads(json.dumps(view.snapshot()))
    assert view.labels == LABELS
    assert snapshot["model"] == {"version": "v9", "labels": list(LABELS)}
    assert snapshot["devices"][0]["latest"]["truth"] == "Jogging"
    assert snapshot["accuracy"] == {"v1": {"right": 0, "wrong": 1, "accuracy": 0.0}}
    assert snapshot["counts"]["confirmations_joined"] == 1


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Limits(predictions_per_device=0)


# Events: (device, prediction id, label, version, is_confirmation)
_EVENT = st.tuples(
    st.sampled_from(["d1", "d2"]),
    st.sampled_from([f"p{i}" for i in range(12)]),
    st.sampled_from(LABELS[:3]),
    st.sampled_from(["v1", "v2", "v3"]),
    st.booleans(),
)


def brute_force_accuracy(events: list[tuple[str, str, str, str, bool]]) -> dict[str, Accuracy]:
    """Join first prediction and first confirmation per (device, id), counting each pair once."""
    predicted: dict[tuple[str, str], tuple[str, str]] = {}
    confirmed: dict[tuple[str, str], str] = {}
    for device, pid, label, version, is_confirmation in events:
        if is_confirmation:
            confirmed.setdefault((device, pid), label)
        else:
            predicted.setdefault((device, pid), (label, version))
    result: dict[str, Accuracy] = {}
    for key, (label, version) in predicted.items():
        if key in confirmed:
            result[version] = result.get(version, Accuracy()).counted(confirmed[key] == label)
    return dict(sorted(result.items()))


def play(view: FleetView, events: list[tuple[str, str, str, str, bool]]) -> None:
    for device, pid, label, version, is_confirmation in events:
        if is_confirmation:
            view.apply_confirmation(device, confirmation(pid, label), now=T0)
        else:
            view.apply_prediction(device, prediction(pid, label, version, device), now=T0)


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=80))
def test_accuracy_equals_brute_force_recount_of_joined_pairs(
    events: list[tuple[str, str, str, str, bool]],
) -> None:
    view = FleetView(Limits(predictions_per_device=12, pending_per_device=12))
    play(view, events)
    expected = brute_force_accuracy(events)
    assert view.accuracy() == expected
    assert view.counts().confirmations_joined == sum(a.confirmed for a in expected.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=120), st.integers(1, 4), st.integers(1, 4))
def test_memory_stays_within_the_bounds(
    events: list[tuple[str, str, str, str, bool]], kept: int, pending: int
) -> None:
    view = FleetView(Limits(predictions_per_device=kept, pending_per_device=pending))
    for index in range(len(events)):
        play(view, events[index : index + 1])
        kept_now, pending_now = view.memory()
        devices = len(view.rows())
        assert kept_now <= kept * devices
        assert pending_now <= pending * devices
    counts = view.counts()
    confirmations = sum(1 for event in events if event[4])
    # Every confirmation is accounted for exactly once.
    assert (
        counts.confirmations_joined
        + counts.confirmations_duplicate
        + counts.confirmations_dropped
        + counts.confirmations_pending
        == confirmations
    )


# ------------------------------------------------------------------------------------- feeding


def test_feed_routes_every_subscribed_topic() -> None:
    view = FleetView()
    messages = [
        (TOPICS.model_manifest(), codec.encode_manifest(manifest("v2"))),
        (TOPICS.status("wrist-1"), codec.encode_status(status("wrist-1", "online"))),
        (TOPICS.prediction("wrist-1"), codec.encode_prediction(prediction("p1", "Walking"))),
        (TOPICS.confirmation("wrist-1"), codec.encode_confirmation(confirmation("p1", "Walking"))),
        (
            TOPICS.error("wrist-1"),
            codec.encode_error(ErrorEvent("wrist-1", "unknown_label", "no such label", T0)),
        ),
    ]
    problems = [feed_message(view, TOPICS, topic, payload, T0) for topic, payload in messages]
    assert problems == [None] * len(messages)
    row = view.row("wrist-1")
    assert row is not None
    assert (row.presence, row.errors, row.confirmations) == ("online", 1, 1)
    assert row.last_error is not None
    assert row.last_error.code == "unknown_label"
    assert view.accuracy() == {"v1": Accuracy(right=1)}
    assert view.labels == LABELS


@pytest.mark.parametrize(
    ("topic", "payload", "problem"),
    [
        (TOPICS.prediction("wrist-1"), b"{not json", "not valid UTF-8 JSON"),
        (TOPICS.status("wrist-1"), b"\xff\xfe", "not valid UTF-8 JSON"),
        (TOPICS.confirmation("wrist-1"), b'{"type":"confirmation","v":2}', "schema version"),
        (
            TOPICS.prediction("wrist-2"),
            codec.encode_prediction(prediction("p1", device="wrist-1")),
            "differs from the topic",
        ),
        (TOPICS.model_manifest(), b"{}", "model manifest"),
        (TOPICS.sensor("wrist-1"), b"\x80", "not a topic the dashboard reads"),
    ],
)
def test_bad_payloads_are_counted_and_described_never_raised(
    topic: str, payload: bytes, problem: str
) -> None:
    view = FleetView()
    returned = feed_message(view, TOPICS, topic, payload, T0)
    assert returned is not None
    assert problem in returned
    assert view.counts().bad_payloads == 1
    assert view.last_bad_payload == returned
    assert view.rows() == []


# ------------------------------------------------------------------------------------- render


def populated_view() -> FleetView:
    view = FleetView()
    view.apply_manifest(manifest("v2"))
    view.apply_status("wrist-1", status("wrist-1", "online", "v1"), now=T0)
    view.apply_prediction("wrist-1", prediction("p1", "Walking", "v1"), now=T0 + 10)
    view.apply_status("wrist-2", status("wrist-2", "offline", "v2"), now=T0)
    view.apply_prediction("wrist-1", prediction("p0", "Jogging", "v1"), now=T0 + 5)
    view.apply_confirmation("wrist-1", confirmation("p1", "Walking"), now=T0)
    view.apply_confirmation("wrist-1", confirmation("p0", "Sitting"), now=T0)
    return view


def frame(selected: str | None = "wrist-1", status_text: str = "ready") -> Frame:
    return Frame("har/v1", "connected to 127.0.0.1:1883", selected, status_text)


def test_render_table_and_footer_as_text() -> None:
    lines = render(populated_view(), frame(), width=200, height=None, now=T0 + 65)
    assert lines[0] == (
        "HAR fleet  devices 2 (1 online)  model v2 (6 labels)  bad payloads 0  "
        "har/v1  connected to 127.0.0.1:1883"
    )
    # The device column is as wide as the longest id (7), at least 6.
    assert lines[1] == "  DEVICE  STATE   ACTIVITY        CONF MODEL          AGE  ERR"
    assert lines[2] == "> wrist-1 online  Jogging          90% v1              1m    0"
    assert lines[3] == "  wrist-2 offline -                  - v2               -    0"
    assert lines[4] == "accuracy of confirmed predictions: v1 1/2 50%"
    assert lines[5] == "wrist-1: prediction p0 Jogging 90% by v1; 2 predictions, 2 confirmations"
    assert lines[6] == (
        "keys: up/down select  c confirm  correct to: 1 Downstairs 2 Jogging 3 Sitting "
        "4 Standing 5 Upstairs 6 Walking  q quit"
    )
    assert lines[7] == "status: ready"
    assert len(lines) == 8


def test_render_respects_width_and_height_and_keeps_selection_visible() -> None:
    view = FleetView()
    for index in range(30):
        device = f"dev-{index:02d}"
        view.apply_status(device, status(device, "online"), now=T0)
    lines = render(view, frame("dev-20"), width=40, height=14, now=T0)
    assert len(lines) == 14
    assert all(len(line) <= 40 for line in lines)
    assert lines[2] == "  (18 more above)"
    assert [line[:8] for line in lines[3:6]] == ["  dev-18", "  dev-19", "> dev-20"]
    assert lines[6] == "  (9 more below)"
    assert lines[-1] == "status: ready"


def test_at_80_by_24_every_key_the_device_count_and_hidden_rows_show() -> None:
    view = FleetView()
    view.apply_manifest(manifest("v2"))
    for index in range(30):
        device = f"wrist-{index:04d}"
        view.apply_status(device, status(device, "online" if index % 3 else "offline"), now=T0)
    lines = render(view, frame("wrist-0000"), width=80, height=24, now=T0)
    assert len(lines) == 24
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("HAR fleet  devices 30 (20 online)  model v2 (6 labels)")
    assert lines[2].startswith("> wrist-0000")
    shown = [line for line in lines if line.startswith(("  wrist-", "> wrist-"))]
    assert f"  ({30 - len(shown)} more below)" in lines
    keys = " ".join(lines)
    for number, label in enumerate(LABELS, start=1):
        assert f"{number} {label}" in keys
    assert "q quit" in keys
    assert lines[-1] == "status: ready"


def test_render_empty_fleet_bad_payloads_and_unknown_labels() -> None:
    view = FleetView()
    view.record_bad_payload("har/v1/devices/x/prediction: invalid prediction: missing field")
    lines = render(view, frame(None, "no prediction"), width=120, height=None, now=T0)
    assert "no model" in lines[0]
    assert "bad payloads 1" in lines[0]
    assert lines[2] == "  (no devices yet: waiting for their status and predictions)"
    assert "accuracy of confirmed predictions: none confirmed yet" in lines
    assert "last bad payload: har/v1/devices/x/prediction: invalid prediction: missing field" in (
        lines
    )
    assert any("labels unknown until the model manifest arrives" in line for line in lines)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (-3.0, "0s"), (59.9, "59s"), (60.0, "1m"), (7200.0, "2h"), (200_000.0, "2d")],
)
def test_format_age(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


# ---------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("key", "action"),
    [
        (ord("q"), Quit()),
        (curses.KEY_UP, Move(-1)),
        (ord("k"), Move(-1)),
        (curses.KEY_DOWN, Move(+1)),
        (ord("j"), Move(+1)),
        (ord("c"), ConfirmAsPredicted()),
        (ord("1"), CorrectTo(1)),
        (ord("9"), CorrectTo(9)),
        (ord("0"), None),
        (ord("x"), None),
        (-1, None),  # curses: no key within the tick
    ],
)
def test_action_for_key(key: int, action: object) -> None:
    assert action_for_key(key) == action


# ------------------------------------------------------------------------------------ settings


def test_settings_example_in_docs_loads(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "watch.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "watch.toml"
    config.write_text(example)
    loaded = load_settings(
        DashboardSettings,
        config_file=config,
        environ={"HAR_ACK_TIMEOUT_S": "4", "HAR_BROKER_PORT": "1884"},
        overrides={"broker.host": "127.0.0.1"},
    )
    assert loaded.ack_timeout_s == 4.0
    assert (loaded.broker.host, loaded.broker.port) == ("127.0.0.1", 1884)
    assert (loaded.broker.username, loaded.broker.tls) == ("watch", True)
    assert loaded.broker.password_file == Path("/etc/har/secrets/watch.password")
    config.write_text('colour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings(DashboardSettings, config_file=config)
    with pytest.raises(ConfigError, match="timeouts must be > 0"):
        DashboardSettings(ack_timeout_s=0)


def test_counts_agree_with_their_nouns() -> None:
    assert counted(1, "confirmation") == "1 confirmation"
    assert counted(0, "confirmation") == "0 confirmations"
    assert counted(2, "prediction") == "2 predictions"
