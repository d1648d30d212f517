"""The trainer's Prometheus endpoint (``[metrics] port``): counters and live accuracy per version.

The collector reads the service on each scrape, on the HTTP server's thread (never paho's), and
keeps nothing between scrapes: its registry belongs to one service, not to the module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.messages import DEVICE_STATES
from trainer_service.store import VersionAccuracy

log = logging.getLogger(__name__)

PREFIX = "har_trainer_"

# Status counters that are counts of what is there now (rows, queue depth), not events.
GAUGES = frozenset(
    {
        "stored_batches",
        "stored_samples",
        "stored_predictions",
        "stored_confirmations",
        "joined_confirmations",
        "devices",
        "inbox_depth",
        "retrain_epoch",
        "retrain_epochs_max",
    }
)

# Event counters exposed from the start, at 0 until they happen: rate() and increase() need the
# first sample, and a dashboard can name them before the first retrain.
EVENTS = (
    "messages_ingested",
    "predictions",
    "confirmations",
    "retrain_rounds",
    "models_promoted",
    "models_refused",
    "models_published",
    "payload_errors",
    "storage_errors",
)


class TrainerCollector(Collector):
    """``har_trainer_<event>_total`` counters, gauges of stored rows, accuracy per version,
    devices per state."""

    def __init__(
        self,
        counters: Callable[[], Mapping[str, int]],
        accuracy: Callable[[], Mapping[str, VersionAccuracy]],
        devices: Callable[[], Mapping[str, int]],
    ) -> None:
        self._counters = counters
        self._accuracy = accuracy
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(EVENTS, 0)
        counts.update(self._counters())
        for name, value in sorted(counts.items()):
            if name in GAUGES:
                yield GaugeMetricFamily(PREFIX + name, f"{name} (now)", value=value)
            else:
                yield CounterMetricFamily(PREFIX + name, f"{name} (since start)", value=value)
        by_version = self._accuracy()
        accuracy = GaugeMetricFamily(
            PREFIX + "live_accuracy",
            "Share of a version's confirmed predictions whose label the user confirmed",
            labels=["model_version"],
        )
        confirmed = GaugeMetricFamily(
            PREFIX + "confirmed_predictions",
            "Stored predictions of a version that a user confirmed or corrected",
            labels=["model_version"],
        )
        for version, shares in by_version.items():
            accuracy.add_metric([version], shares.accuracy)
            confirmed.add_metric([version], shares.confirmed)
        yield accuracy
        yield confirmed
        devices = GaugeMetricFamily(
            PREFIX + "devices_by_state",
            "Devices per last reported status (unknown: none yet; online: its last word)",
            labels=["state"],
        )
        by_state = self._devices()
        # Every state a device can report, 0 included: "online 0" is a value, a missing series
        # is "No data" on a dashboard.
        for state in sorted(set(DEVICE_STATES) | set(by_state)):
            devices.add_metric([state], by_state.get(state, 0))
        yield devices


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free port, see ``port``)."""

    def __init__(self, collector: Collector, host: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
