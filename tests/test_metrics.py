"""The trainer's Prometheus endpoint: live accuracy per version, and a real scrape."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from har.local_broker import free_port
from shared import codec
from shared.config import BrokerSettings
from shared.messages import Confirmation, DeviceStatus, Prediction, WindowRef
from shared.topics import Topics
from tests.mqtt_helpers import connect
from tests.trainer_helpers import WAIT, publish, trainer_settings_for
from trainer_service.metrics import GAUGES, TrainerCollector
from trainer_service.service import TrainerService
from trainer_service.settings import MetricsSettings
from trainer_service.store import SqliteStore, VersionAccuracy


def predicted(device: str, pid: str, label: str, version: str) -> Prediction:
    return Prediction(pid, device, WindowRef(0, 0, 10), label, 0, (1.0,), version, 1.0)


def test_accuracy_per_version_counts_confirmed_predictions_of_the_same_device(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "t.sqlite3")
    with store.transaction() as writer:
        writer.add_prediction(predicted("d1", "p1", "Walking", "v1"))
        writer.add_prediction(predicted("d1", "p2", "Walking", "v1"))
        writer.add_prediction(predicted("d1", "p3", "Sitting", "v2"))
        writer.add_prediction(predicted("d1", "p4", "Sitting", "v2"))  # never confirmed
        writer.add_confirmation("d1", Confirmation("p1", "Walking", "user", 2.0))
        writer.add_confirmation("d1", Confirmation("p2", "Jogging", "user", 2.0))
        writer.add_confirmation("d1", Confirmation("p3", "Sitting", "user", 2.0))
        writer.add_confirmation("d2", Confirmation("p4", "Sitting", "user", 2.0))  # not d1's
    assert store.accuracy_by_version() == {
        "v1": VersionAccuracy(confirmed=2, correct=1),
        "v2": VersionAccuracy(confirmed=1, correct=1),
    }
    assert store.accuracy_by_version()["v1"].accuracy == 0.5
    with store.transaction() as writer:
        writer.update_status(DeviceStatus("d3", "online", "v2", 3.0))
    assert store.devices_by_state() == {"online": 1, "unknown": 2}
    store.close()


@pytest.fixture
def service(broker_settings: BrokerSettings, tmp_path: Path) -> Iterator[TrainerService]:
    settings = trainer_settings_for(
        broker_settings, tmp_path, metrics=MetricsSettings(port=free_port())
    )
    running = TrainerService(settings)
    running.start()
    assert running.wait_connected(WAIT)
    yield running
    running.shutdown()


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` as Prometheus would parse the page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


@pytest.mark.broker
def test_the_endpoint_serves_counters_and_live_accuracy_per_version(
    service: TrainerService, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    device, _ = connect(broker_settings)
    try:
        for pid, confirmed in (("p1", "Walking"), ("p2", "Sitting")):  # one right, one wrong
            publish(
                device,
                topics.prediction("d1"),
                codec.encode_prediction(predicted("d1", pid, "Walking", "v7")),
                msgpack=False,
            )
            publish(
                device,
                topics.confirmation("d1"),
                codec.encode_confirmation(Confirmation(pid, confirmed, "user", 2.0)),
                msgpack=False,
            )
        status = DeviceStatus("d2", "online", "v7", 3.0)
        publish(device, topics.status("d2"), codec.encode_status(status), msgpack=False)
        assert service.counters.wait_until("messages_ingested", 5, WAIT)
    finally:
        device.stop()
    assert service.metrics is not None
    samples = scrape(service.metrics.port)
    assert samples["har_trainer_messages_ingested_total"][()] == 5
    assert samples["har_trainer_predictions_total"][()] == 2
    assert samples["har_trainer_confirmations_total"][()] == 2
    assert samples["har_trainer_stored_confirmations"][()] == 2
    assert samples["har_trainer_devices"][()] == 2
    assert samples["har_trainer_devices_by_state"] == {
        (("state", "online"),): 1,
        (("state", "unknown"),): 1,  # d1 has sent no status
        (("state", "offline"),): 0,  # every state, 0 included: "0 online" is not "No data"
        (("state", "failed"),): 0,
    }
    assert samples["har_trainer_live_accuracy"] == {(("model_version", "v7"),): 0.5}
    assert samples["har_trainer_confirmed_predictions"] == {(("model_version", "v7"),): 2}


def test_metrics_are_off_by_default_and_on_loopback_when_on() -> None:
    assert MetricsSettings().port == 0
    assert MetricsSettings().host == "127.0.0.1"


DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "har-trainer.json"


def test_an_idle_trainer_exports_every_device_state_as_0() -> None:
    idle = TrainerCollector(lambda: dict.fromkeys(GAUGES, 0), dict, dict)
    [family] = [f for f in idle.collect() if f.name == "har_trainer_devices_by_state"]
    assert {s.labels["state"]: s.value for s in family.samples} == {
        "online": 0,
        "offline": 0,
        "failed": 0,
        "unknown": 0,
    }


def test_the_grafana_stat_panels_show_0_rather_than_no_data() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    stats = [panel for panel in dashboard["panels"] if panel["type"] == "stat"]
    assert stats
    for panel in stats:
        assert panel["fieldConfig"]["defaults"]["noValue"] == "0", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].endswith(" or vector(0)"), panel["title"]


def test_the_grafana_dashboard_only_queries_metrics_the_endpoint_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # What a trainer that has seen nothing yet exposes: every name the dashboard may rely on.
    idle = TrainerCollector(lambda: dict.fromkeys(GAUGES, 0), dict, dict)
    exposed = {sample.name for family in idle.collect() for sample in family.samples}
    exposed |= {family.name for family in idle.collect()}  # labelled families, empty when idle
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bhar_trainer_\w+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried <= exposed, f"not exposed: {sorted(queried - exposed)}"
    assert "har_trainer_live_accuracy" in queried
    assert "har_trainer_messages_ingested_total" in queried


def test_every_grafana_panel_says_what_an_empty_result_means() -> None:
    """Not Grafana's bare "No data": a panel whose series a running trainer always exports says
    the trainer is not reporting; the accuracy panel, that nothing was confirmed yet."""
    dashboard = json.loads(DASHBOARD.read_text())
    idle = TrainerCollector(lambda: dict.fromkeys(GAUGES, 0), dict, dict)
    exported_when_idle = {sample.name for family in idle.collect() for sample in family.samples}
    for panel in dashboard["panels"]:
        no_value = panel["fieldConfig"]["defaults"]["noValue"]
        names = {
            name
            for target in panel["targets"]
            for name in re.findall(r"\bhar_trainer_\w+", target["expr"])
        }
        if panel["type"] == "stat":
            assert no_value == "0", panel["title"]
        elif names <= exported_when_idle:
            assert no_value.startswith("no data from the trainer"), panel["title"]
        else:
            assert no_value == "no confirmed predictions yet", panel["title"]
