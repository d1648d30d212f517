"""`har keys`, `har models` and `har trainer retrain` as an operator types them."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from har.cli import main
from shared import codec
from shared.config import BrokerSettings
from shared.topics import Topics
from simulator.tiny_model import export_tiny_version
from tests.mqtt_helpers import connect, receive

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_keys_models_promote_and_rollback_publish_signed_manifests(
    broker_settings: BrokerSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path / "keys")]) == 0
    private = tmp_path / "keys" / "model-signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "key id:" in capsys.readouterr().out
    assert main(["keys", "generate", "--out", str(tmp_path / "keys")]) == 2  # never overwrite

    common = [
        "--registry-dir", str(tmp_path / "registry"),
        "--broker-host", broker_settings.host,
        "--broker-port", str(broker_settings.port),
        "--topic-root", broker_settings.topic_root,
    ]  # fmt: skip
    first = export_tiny_version(tmp_path / "stage" / "m-one", seed=1, steps=10)
    second = export_tiny_version(tmp_path / "stage" / "m-two", seed=2, steps=10)
    exported = sorted(path.relative_to(first) for path in first.rglob("*"))
    assert main(["models", "import", str(first), *common]) == 0
    assert main(["models", "import", str(second), "--parent", "m-one", *common]) == 0
    # The registry holds copies: what was imported is left as it was.
    assert sorted(path.relative_to(first) for path in first.rglob("*")) == exported
    capsys.readouterr()

    topics = Topics(broker_settings.topic_root)
    watcher, inbox = connect(broker_settings, [(topics.model_manifest(), 1)])
    try:
        keyed = [*common, "--private-key", str(private)]
        assert main(["models", "promote", "m-one", *keyed]) == 0
        assert codec.decode_manifest(receive(inbox).payload).version == "m-one"
        assert main(["models", "promote", "m-two", *keyed]) == 0
        newer = codec.decode_manifest(receive(inbox).payload)
        assert newer.version == "m-two"
        assert newer.parent == "m-one"
        assert main(["models", "rollback", *keyed]) == 0
        rolled_back = codec.decode_manifest(receive(inbox).payload)
        assert rolled_back.version == "m-one"
        assert rolled_back.created > newer.created  # re-signed: devices accept it, not a replay
    finally:
        watcher.stop()

    capsys.readouterr()
    assert main(["models", "list", "--json", *common]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["current"]) for v in listed] == [("m-one", True), ("m-two", False)]
    plot = tmp_path / "versions.png"
    assert main(["models", "plot", "--out", str(plot), *common]) == 0
    assert "(2 versions)" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["models", "show", "m-two", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["parent"] == "m-one"
    assert shown["metrics"]["test"]["accuracy"] >= 0.0
    assert main(["models", "show", "nope", *common]) == 2


def test_retrain_command_reaches_the_command_topic(
    broker_settings: BrokerSettings, tmp_path: Path
) -> None:
    topics = Topics(broker_settings.topic_root)
    watcher, inbox = connect(broker_settings, [(topics.trainer_command(), 1)])
    try:
        flags = ["--broker-host", broker_settings.host, "--broker-port", str(broker_settings.port)]
        code = main(["trainer", "retrain", *flags, "--topic-root", broker_settings.topic_root])
        assert code == 0
        assert codec.decode_command(receive(inbox).payload).command == "retrain"
    finally:
        watcher.stop()
