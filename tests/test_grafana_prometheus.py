"""Every expression of the Grafana dashboard (deploy/grafana/har-trainer.json), evaluated by
Prometheus itself (``promtool test rules``, Debian's ``prometheus`` package) on the series a real
trainer collector exports, scraped once a minute: an idle trainer, and one with traffic.

The input is what ``/metrics`` serves (prometheus_client's exposition of ``TrainerCollector``,
parsed back), so a renamed metric or label fails here as it would on a dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainer_service.metrics import GAUGES, TrainerCollector
from trainer_service.store import VersionAccuracy

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "har-trainer.json"
# On PATH, or where scripts/setup.sh unpacks it.
PROMTOOL = shutil.which("promtool") or shutil.which(
    "promtool", path=str(Path(__file__).resolve().parent.parent / ".venv" / "prometheus" / "bin")
)
MINUTES = 15  # scrapes, one a minute; the expressions are evaluated at the last one

pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found on PATH or in .venv/prometheus/bin: scripts/setup.sh unpacks it "
    "from Debian's prometheus package (apt-get download prometheus failed?)",
)


def dashboard_expressions() -> dict[str, str]:
    """Each target's expression, by panel title and refId."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
    }


def scraped(collector: TrainerCollector) -> dict[str, float]:
    """One scrape of the collector as Prometheus reads it: series text -> value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            series[f"{sample.name}{{{labels}}}"] = sample.value
    return series


Held = tuple[Mapping[str, int], Mapping[str, VersionAccuracy], Mapping[str, int]]
Trainer = Callable[[int], Held]  # counters, accuracy per version, devices per state at a minute


def collector_of(held: Held) -> TrainerCollector:
    counters, accuracy, devices = held
    return TrainerCollector(lambda: counters, lambda: accuracy, lambda: devices)


def input_series(trainer: Trainer) -> list[dict[str, str]]:
    """A scrape a minute for MINUTES minutes of what ``trainer(minute)`` holds then."""
    scrapes = [scraped(collector_of(trainer(minute))) for minute in range(MINUTES + 1)]
    names = sorted(set().union(*scrapes))
    # "_" is a missed scrape: a series that appears later (a version's first confirmation).
    return [
        {
            "series": name,
            "values": " ".join(repr(s[name]) if name in s else "_" for s in scrapes),
        }
        for name in names
    ]


def run_promtool(
    tmp_path: Path, series: list[dict[str, str]], expected: dict[str, list[tuple[str, float]]]
) -> None:
    expressions = dashboard_expressions()
    assert set(expected) == set(expressions), "every panel's expression has its expectation"
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": expressions[panel],
                        "eval_time": f"{MINUTES}m",
                        "exp_samples": [
                            {"labels": labels, "value": value} for labels, value in samples
                        ],
                    }
                    for panel, samples in expected.items()
                ],
            }
        ],
    }
    test_file = tmp_path / "dashboard_test.yml"
    test_file.write_text(json.dumps(tests, indent=1))  # JSON is YAML
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def idle(_minute: int) -> tuple[dict[str, int], dict[str, VersionAccuracy], dict[str, int]]:
    return dict.fromkeys(GAUGES, 0), {}, {}


def busy(minute: int) -> tuple[dict[str, int], dict[str, VersionAccuracy], dict[str, int]]:
    """600 messages a minute; a retrain at minutes 5 (promoted) and 10 (refused); v0002's
    first confirmations come at minute 12; two devices online, one offline."""
    counters = dict.fromkeys(GAUGES, 0)
    counters.update(
        messages_ingested=600 * minute,
        inbox_depth=7,
        retrain_rounds=(minute >= 5) + (minute >= 10),
        models_promoted=int(minute >= 5),
        models_refused=int(minute >= 10),
    )
    accuracy = {"v0001": VersionAccuracy(confirmed=40, correct=36)}
    if minute >= 12:
        accuracy["v0002"] = VersionAccuracy(confirmed=8, correct=8)
    return counters, accuracy, {"online": 2, "offline": 1}


def by_state(online: int, offline: int) -> list[tuple[str, float]]:
    return [
        (f'har_trainer_devices_by_state{{state="{state}"}}', count)
        for state, count in (
            ("failed", 0),
            ("offline", offline),
            ("online", online),
            ("unknown", 0),
        )
    ]


def test_an_idle_trainer_shows_0_where_a_count_is_asked_for(tmp_path: Path) -> None:
    run_promtool(
        tmp_path,
        input_series(idle),
        {
            "Ingest rate (messages/s) [A]": [("{}", 0)],
            "Lag: inbox depth (messages waiting to be stored) [A]": [
                ("har_trainer_inbox_depth", 0)
            ],
            # 0, not an empty result: no device is online.
            "Devices online [A]": [("{}", 0)],
            "Devices by last reported state [A]": by_state(online=0, offline=0),
            # Nothing confirmed yet: no series (the panel says so with its noValue text).
            "Live accuracy per model version (confirmed predictions) [A]": [],
            "Retrain history: rounds, promoted, refused [A]": [("{}", 0)],
            "Retrain history: rounds, promoted, refused [B]": [("{}", 0)],
            "Retrain history: rounds, promoted, refused [C]": [("{}", 0)],
        },
    )


def test_a_busy_trainer_shows_rates_counts_and_accuracy_per_version(tmp_path: Path) -> None:
    run_promtool(
        tmp_path,
        input_series(busy),
        {
            "Ingest rate (messages/s) [A]": [("{}", 10)],  # 600 a minute
            "Lag: inbox depth (messages waiting to be stored) [A]": [
                ("har_trainer_inbox_depth", 7)
            ],
            "Devices online [A]": [("{}", 2)],
            "Devices by last reported state [A]": by_state(online=2, offline=1),
            "Live accuracy per model version (confirmed predictions) [A]": [
                ('har_trainer_live_accuracy{model_version="v0001"}', 0.9),
                ('har_trainer_live_accuracy{model_version="v0002"}', 1.0),
            ],
            "Retrain history: rounds, promoted, refused [A]": [("{}", 2)],
            "Retrain history: rounds, promoted, refused [B]": [("{}", 1)],
            "Retrain history: rounds, promoted, refused [C]": [("{}", 1)],
        },
    )


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    """The harness can fail: promtool reports a value the dashboard would not show."""
    with pytest.raises(AssertionError, match="exp"):
        run_promtool(
            tmp_path,
            input_series(idle),
            {panel: [("{}", 42)] for panel in dashboard_expressions()},
        )
