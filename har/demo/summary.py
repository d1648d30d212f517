"""The demo's summary: a JSON document (``summary.json``) and the same facts as text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from har.demo.people import DeviceView, PeopleApp, Score

PHASES = ("before", "while_confirming", "learned", "after")
PHASE_TITLES = {
    "before": "first model, before any confirmation",
    "while_confirming": "first model + on-device learning, while people confirm",
    "learned": "first model + what the device learned, after the last confirmation",
    "after": "retrained model, personalised again on the device",
}


def _phase(device: DeviceView, phase: str) -> Score:
    score: Score = getattr(device, phase)
    return score


def _total(app: PeopleApp, *names: str, source: str = "devices") -> int:
    """The sum of counters ``names`` over every device's last status (or the trainer's)."""
    if source == "trainer":
        statuses = [app.trainer_status]
    else:
        statuses = [device.status for device in app.devices.values()]
    return sum(
        status.counters.get(name, 0) for status in statuses if status is not None for name in names
    )


def build(
    app: PeopleApp,
    *,
    data: str,
    wearers: Mapping[str, str],
    first_model: Mapping[str, Any],
    seconds: float,
    exit_codes: Mapping[str, int],
    outcome: str,
) -> dict[str, Any]:
    devices = {}
    for device_id, device in app.devices.items():
        status = device.status
        devices[device_id] = {
            "wearer": wearers.get(device_id, ""),
            "accuracy": {phase: _phase(device, phase).to_dict() for phase in PHASES},
            "model_version": status.model_version if status else None,
            "state": status.state if status else None,
            "confirmations_sent": device.confirmations_sent,
            "wrong_answers": device.wrong_answers,
            "learned_state_served": device.learned_served,
            "counters": dict(status.counters) if status else {},
        }
    overall = {}
    for phase in PHASES:
        total = Score()
        for device in app.devices.values():
            score = _phase(device, phase)
            total.windows += score.windows
            total.correct += score.correct
            total.versions |= score.versions
        overall[phase] = total.to_dict()
    trainer = app.trainer_status
    messages = {
        "sensor_batches": {
            "queued_by_devices": _total(app, "batches_queued"),
            "stored_by_trainer": _total(app, "stored_batches", source="trainer"),
        },
        "predictions": {
            "made_by_devices": _total(app, "predictions"),
            "received_by_people_app": app.received["predictions"],
            "stored_by_trainer": _total(app, "stored_predictions", source="trainer"),
        },
        "confirmations": {
            "sent_by_people_app": app.confirmations_sent,
            "seen_on_the_broker_by_people_app": app.received["confirmations"],
            "received_by_devices": _total(app, "confirmations_received"),
            "applied_by_devices": _total(app, "confirmations_applied"),
            "stored_by_trainer": _total(app, "stored_confirmations", source="trainer"),
        },
        "statuses": {
            "device_statuses_received": app.received["statuses"],
            "trainer_statuses_received": app.received["trainer_statuses"],
        },
        "model": {
            "manifests_received_by_people_app": app.received["model_manifests"],
            "installs_on_devices": _total(app, "model_installs"),
            "refused_by_devices": _total(app, "model_rejections"),
            "retrain_rounds": _total(app, "retrain_rounds", source="trainer"),
            "promoted_by_trainer": _total(app, "models_promoted", source="trainer"),
        },
        "all_kinds": {
            "sent_by_devices": _total(app, "messages_sent"),
            "ingested_by_trainer": _total(app, "messages_ingested", source="trainer"),
            "received_by_people_app": sum(app.received.values()),
        },
    }
    return {
        "outcome": outcome,
        "data": data,
        "first_model": dict(first_model),
        "new_model": app.new_version,
        "devices": devices,
        "overall": overall,
        "messages": messages,
        "trainer_counters": dict(trainer.counters) if trainer else {},
        "error_events": app.errors,
        "seconds": round(seconds, 1),
        "exit_codes": dict(exit_codes),
    }


def _percent(score: Mapping[str, Any]) -> str:
    accuracy = score["accuracy"]
    return "   -  " if accuracy is None else f"{100 * accuracy:5.1f}%"


def below_first_model(summary: Mapping[str, Any]) -> list[str]:
    """Devices whose last scored phase (after, else learned) is below their "before"."""
    below = []
    for name, row in summary["devices"].items():
        accuracy = row["accuracy"]
        first = accuracy["before"]["accuracy"]
        last = next(
            (accuracy[p]["accuracy"] for p in ("after", "learned") if accuracy[p]["windows"]),
            None,
        )
        if first is not None and last is not None and last < first:
            below.append(name)
    return below


KEPT_WITHIN_POINTS = 2.0  # what a device learned may cost this much across a new version


def lost_learning(summary: Mapping[str, Any]) -> list[str]:
    """Devices whose accuracy with the new version ("after") is more than
    ``KEPT_WITHIN_POINTS`` below what they had learned on the first one ("learned")."""
    lost = []
    for name, row in summary["devices"].items():
        learned, after = row["accuracy"]["learned"], row["accuracy"]["after"]
        if learned["accuracy"] is None or after["accuracy"] is None:
            continue
        if 100 * (learned["accuracy"] - after["accuracy"]) > KEPT_WITHIN_POINTS:
            lost.append(name)
    return lost


def render(summary: Mapping[str, Any]) -> str:
    """The summary as a person reads it."""
    lines = [
        f"outcome: {summary['outcome']}",
        f"data: {summary['data']}",
        f"first model: {summary['first_model'].get('version')} "
        f"(held-out-user accuracy {summary['first_model'].get('test_accuracy')})",
        f"new model:   {summary['new_model'] or 'none'}",
        "",
        "accuracy per device (before, learned and after: at most one pass of the recording;",
        "'served': the device answered with what it learned in the 'learned' phase, or with the",
        "global model because its learned state had not beaten it on the latest confirmations):",
        f"  {'device':<14} {'before':>7} {'learning':>9} {'learned':>8} {'after':>7} "
        f"{'served':>7}  {'model on device':<22} confirmed (wrong)  wearer",
    ]
    rows = [*summary["devices"].items(), ("overall", summary["overall"])]
    for name, row in rows:
        accuracy = row.get("accuracy", row)
        version = row.get("model_version") or ("" if name == "overall" else "unknown")
        confirmed = (
            f"{row['confirmations_sent']} ({row['wrong_answers']})" if "wearer" in row else ""
        )
        served = {True: "learned", False: "global", None: ""}[row.get("learned_state_served")]
        lines.append(
            f"  {name:<14} {_percent(accuracy['before']):>7} "
            f"{_percent(accuracy['while_confirming']):>9} {_percent(accuracy['learned']):>8} "
            f"{_percent(accuracy['after']):>7} {served:>7}  "
            f"{version:<22} {confirmed:<17}  {row.get('wearer', '')}".rstrip()
        )
    below = below_first_model(summary)
    lines += [
        "",
        "no device ended below its first model's accuracy"
        if not below
        else f"ended below their first model's accuracy: {', '.join(below)}",
    ]
    if summary["new_model"]:
        lost = lost_learning(summary)
        lines.append(
            f"every device kept what it learned across the new model (within "
            f"{KEPT_WITHIN_POINTS:g} points)"
            if not lost
            else f"lost more than {KEPT_WITHIN_POINTS:g} points of what they learned with the "
            f"new model: {', '.join(lost)}"
        )
    lines += ["", "phases: " + "; ".join(f"{k}: {v}" for k, v in PHASE_TITLES.items()), ""]
    lines.append("messages:")
    for kind, counts in summary["messages"].items():
        lines.append(
            f"  {kind.replace('_', ' ')}: "
            + ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in counts.items())
        )
    codes = ", ".join(f"{name} {code}" for name, code in summary["exit_codes"].items())
    lines += [
        "",
        f"time: {summary['seconds']} s; exit codes: {codes or 'none'}",
        f"error events: {len(summary['error_events'])}",
    ]
    lines += [f"  {event}" for event in summary["error_events"][:10]]
    return "\n".join(lines)
