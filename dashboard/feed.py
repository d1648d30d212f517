"""One received message -> the fleet view: decode by topic, check, apply. Pure, no I/O.

A payload that breaks the contract is counted and described in the view (and returned, so the
caller can log it); it never raises.
"""

from __future__ import annotations

from dashboard.fleet_view import FleetView
from shared import codec
from shared.errors import PayloadError
from shared.topics import Topics

# The per-device topics the dashboard subscribes to (Topics.kind_of gives the last level).
SUBSCRIBED_KINDS = ("prediction", "status", "confirmation", "error")


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """What the dashboard subscribes to, all at QoS 1 as published."""
    return [
        (topics.all_prediction(), 1),
        (topics.all_status(), 1),
        (topics.all_confirmation(), 1),
        (topics.all_error(), 1),
        (topics.model_manifest(), 1),
    ]


def feed_message(
    view: FleetView, topics: Topics, topic: str, payload: bytes, now: float
) -> str | None:
    """Apply one message to ``view``; returns what was wrong with it, or None if it was fine."""
    try:
        _apply(view, topics, topic, payload, now)
    except PayloadError as exc:
        problem = f"{topic}: {exc}"
        view.record_bad_payload(problem)
        return problem
    return None


def _apply(view: FleetView, topics: Topics, topic: str, payload: bytes, now: float) -> None:
    if topic == topics.model_manifest():
        # Shown for its labels only; devices verify the signature before they use a model.
        view.apply_manifest(codec.decode_manifest(payload))
        return
    device_id = topics.device_of(topic)
    kind = topics.kind_of(topic)
    if device_id is None or kind not in SUBSCRIBED_KINDS:
        raise PayloadError("not a topic the dashboard reads")
    if kind == "prediction":
        prediction = codec.decode_prediction(payload)
        _check_same_device(device_id, prediction.device_id)
        view.apply_prediction(device_id, prediction, now)
    elif kind == "status":
        status = codec.decode_status(payload)
        _check_same_device(device_id, status.device_id)
        view.apply_status(device_id, status, now)
    elif kind == "confirmation":
        view.apply_confirmation(device_id, codec.decode_confirmation(payload), now)
    else:
        view.apply_error(device_id, codec.decode_error(payload), now)


def _check_same_device(in_topic: str, in_payload: str) -> None:
    # The broker's ACL ties the topic to the publisher's login: the payload must agree with it.
    if in_topic != in_payload:
        raise PayloadError(f"device_id {in_payload!r} in the payload differs from the topic's")
