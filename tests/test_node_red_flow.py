"""docs/node-red-flow.json keeps to the protocol: wiring, topics, and the confirmation it builds.

- the flow's structure: unique ids, wires and groups pointing at nodes that exist, every MQTT
  node on the one broker node at QoS 1, subscribed to the contract's topic filters;
- its function code is the code docs/dashboards.md shows, and (run with Node.js) turns real
  messages into what the page says; the confirmation it builds is decoded by the project's codec;
- with Node-RED installed (scripts/install-node-red.sh), the flow imported into a real Node-RED
  against a real Mosquitto confirms a prediction the broker delivered.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import codec
from shared.config import BrokerSettings
from shared.messages import Prediction, WindowRef
from shared.mqtt_transport import Outbound
from shared.topics import Topics
from tests.homeassistant_helpers import sample_messages
from tests.mosquitto import LOOPBACK, MosquittoProcess, free_port
from tests.mqtt_helpers import connect

REPO = Path(__file__).resolve().parent.parent
FLOW_FILE = REPO / "docs" / "node-red-flow.json"
DOC = (REPO / "docs" / "dashboards.md").read_text(encoding="utf-8")
NODE_RED = REPO / ".venv" / "node-red" / "node_modules" / ".bin" / "node-red"
ROOT = "har/v1"
DEVICE = "wrist-0001"


def flow_nodes() -> dict[str, dict[str, Any]]:
    nodes = json.loads(FLOW_FILE.read_text(encoding="utf-8"))
    assert isinstance(nodes, list)
    by_id = {node["id"]: node for node in nodes}
    assert len(by_id) == len(nodes), "node ids must be unique"
    return by_id


def doc_block(label: str) -> str:
    found = re.findall(rf"^```\w+ {re.escape(label)}\n(.*?)\n```$", DOC, re.MULTILINE | re.DOTALL)
    assert len(found) == 1, f"expected one block labelled {label!r} in docs/dashboards.md"
    return str(found[0])


def of_type(nodes: dict[str, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [node for node in nodes.values() if node["type"] == kind]


def downstream(nodes: dict[str, dict[str, Any]], start: str) -> set[str]:
    """Every node id a message from ``start`` can reach."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for output in nodes[todo.pop()].get("wires", []):
            for target in output:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
    return seen


def test_flow_is_wired_to_nodes_that_exist_on_one_tab_and_one_broker() -> None:
    nodes = flow_nodes()
    (tab,) = of_type(nodes, "tab")
    (broker,) = of_type(nodes, "mqtt-broker")
    groups = {node["id"] for node in of_type(nodes, "ui_group")}
    tabs = {node["id"] for node in of_type(nodes, "ui_tab")}
    config_types = {"tab", "mqtt-broker", "ui_tab", "ui_group"}
    for node in nodes.values():
        if node["type"] not in config_types:
            assert node["z"] == tab["id"], node["id"]
        for output in node.get("wires", []):
            assert set(output) <= set(nodes), f"{node['id']} wires to an unknown node"
        if node["type"].startswith("ui_") and node["type"] not in config_types:
            assert node["group"] in groups, node["id"]
        if node["type"] == "ui_group":
            assert node["tab"] in tabs
        if node["type"] in ("mqtt in", "mqtt out"):
            assert node["broker"] == broker["id"]
            assert node["qos"] == "1"
    # No credentials in the file: the password is set in the editor (kept in flows_cred.json).
    assert not {"credentials", "user", "password"} & set(broker)


def test_flow_subscribes_to_the_contracts_topics_and_publishes_confirmations() -> None:
    nodes = flow_nodes()
    topics = Topics(ROOT)
    subscribed = {node["name"]: node["topic"] for node in of_type(nodes, "mqtt in")}
    assert subscribed == {
        "predictions": topics.all_prediction(),
        "status": topics.all_status(),
        "errors": topics.all_error(),
        "model manifest": topics.model_manifest(),
    }
    (out,) = of_type(nodes, "mqtt out")
    assert out["topic"] == "", "the topic comes from the message: the device's own"
    assert out["retain"] == "false"
    assert out["contentType"] == "application/json"
    # Every way to confirm or correct leads to the one confirmation function, then out.
    for trigger in ("har-confirm-button", "har-confirm-inject", "har-correct-dropdown"):
        assert nodes[trigger]["wires"] == [["har-confirmation"]]
    assert out["id"] in downstream(nodes, "har-confirmation")
    # Predictions reach the remembered latest, and the widgets; errors reach their own.
    assert {"har-latest", "har-activity-text", "har-confidence-gauge"} <= downstream(
        nodes, "har-predictions-in"
    )
    assert {"har-errors-debug", "har-errors-text"} <= downstream(nodes, "har-errors-in")
    assert "har-correct-dropdown" in downstream(nodes, "har-manifest-in")
    assert out["id"] not in downstream(nodes, "har-predictions-in"), "only a person confirms"


def test_flow_functions_are_the_code_the_page_shows() -> None:
    nodes = flow_nodes()
    assert nodes["har-predictions-fields"]["func"] == doc_block("node-red-predictions")
    assert nodes["har-status-fields"]["func"] == doc_block("node-red-status")
    assert nodes["har-errors-fields"]["func"] == doc_block("node-red-errors")
    assert nodes["har-confirmation"]["func"] == doc_block("node-red-confirmation")
    assert "node-red-flow.json" in DOC
    assert "Node-RED 4.1.8" in DOC


# ------------------------------------------------------------------------------ under Node.js

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


def run_function(
    code: str, msg: dict[str, Any], context: dict[str, Any] | None = None
) -> tuple[Any, list[str]]:
    """Run a Node-RED function body as Node-RED does: ``msg`` in, the returned value out, with a
    flow context holding ``context`` and ``node.warn``; returns (output, warnings)."""
    harness = (
        "const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const store = new Map(Object.entries(input.context));"
        "const flow = {get: (k) => store.get(k), set: (k, v) => store.set(k, v)};"
        "const warnings = [];"
        "const node = {warn: (w) => warnings.push(String(w))};"
        "const run = new Function('msg', 'flow', 'node', input.code);"
        "const out = run(input.msg, flow, node);"
        "process.stdout.write(JSON.stringify({out: out === undefined ? null : out, warnings}));"
    )
    request = json.dumps({"code": code, "msg": msg, "context": context or {}})
    result = subprocess.run(
        ["node", "-e", harness],
        input=request,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    return answer["out"], answer["warnings"]


def incoming(topic: str, payload: bytes) -> dict[str, Any]:
    """A message as the flow's json node hands it on."""
    return {"topic": topic, "payload": json.loads(payload)}


@needs_node
def test_functions_turn_real_messages_into_what_the_page_shows() -> None:
    topics = Topics(ROOT)
    nodes = flow_nodes()
    samples = sample_messages(DEVICE)
    out, _ = run_function(
        nodes["har-predictions-fields"]["func"],
        incoming(topics.prediction(DEVICE), samples["prediction"][0]),
    )
    assert out["topic"] == DEVICE
    assert out["payload"] == json.loads(doc_block("node-red-output"))
    online, offline = (
        run_function(nodes["har-status-fields"]["func"], incoming(topics.status(DEVICE), p))[0]
        for p in samples["status"]
    )
    assert online["payload"] == {"device": DEVICE, "state": "online", "model_version": "v0007"}
    assert offline["payload"] == {"device": DEVICE, "state": "offline", "model_version": None}


@needs_node
def test_errors_function_keeps_code_and_message() -> None:
    from shared.messages import ErrorEvent

    event = ErrorEvent(DEVICE, "unknown_label", "label 'Flying' is unknown", 12.5, "t")
    out, _ = run_function(
        flow_nodes()["har-errors-fields"]["func"],
        incoming(Topics(ROOT).error(DEVICE), codec.encode_error(event)),
    )
    assert out["payload"] == {
        "device": DEVICE,
        "code": "unknown_label",
        "message": "label 'Flying' is unknown",
        "ts": 12.5,
    }


@needs_node
def test_confirmation_built_is_one_the_agent_accepts() -> None:
    topics = Topics(ROOT)
    nodes = flow_nodes()
    prediction = sample_messages(DEVICE)["prediction"][0]
    latest, _ = run_function(
        nodes["har-predictions-fields"]["func"], incoming(topics.prediction(DEVICE), prediction)
    )
    remembered, _ = run_function(nodes["har-latest"]["func"], latest)
    assert remembered == latest
    context = {"latest": latest["payload"]}
    predicted = codec.decode_prediction(prediction)
    before = time.time()
    for trigger, label in (("", predicted.label), ("Jogging", "Jogging")):
        out, warnings = run_function(
            nodes["har-confirmation"]["func"], {"payload": trigger}, context
        )
        assert warnings == []
        assert out["topic"] == topics.confirmation(DEVICE)
        confirmation = codec.decode_confirmation(out["payload"].encode())  # the agent's decoder
        assert confirmation.prediction_id == predicted.prediction_id
        assert confirmation.label == label
        assert confirmation.source == "user"
        assert before - 1 <= confirmation.ts <= time.time() + 1
    # Before any prediction there is nothing to confirm: no message, a warning.
    out, warnings = run_function(nodes["har-confirmation"]["func"], {"payload": ""}, {})
    assert out is None
    assert warnings == ["no prediction yet: nothing to confirm"]


@needs_node
def test_labels_function_gives_the_manifests_labels_as_choices() -> None:
    manifest = {"type": "model_manifest", "labels": ["Walking", "Sitting"]}
    out, _ = run_function(
        flow_nodes()["har-labels"]["func"],
        {"topic": Topics(ROOT).model_manifest(), "payload": manifest},
    )
    assert out == {"options": ["Walking", "Sitting"]}


# ------------------------------------------------------------------------------ real Node-RED


class NodeRed:
    """``node-red`` on a free loopback port with a temporary user folder; its output collected."""

    def __init__(self, user_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://{LOOPBACK}:{self.port}"
        user_dir.mkdir(parents=True, exist_ok=True)
        settings = user_dir / "settings.js"
        settings.write_text(
            "module.exports = {\n"
            f'  uiHost: "{LOOPBACK}",\n'
            f"  uiPort: {self.port},\n"
            '  flowFile: "flows.json",\n'
            "  credentialSecret: false,\n"
            "  telemetry: {enabled: false},\n"
            "  diagnostics: {enabled: false},\n"
            '  logging: {console: {level: "info"}},\n'
            "};\n"
        )
        self.output: list[str] = []
        self._more = threading.Condition()
        self._process = subprocess.Popen(
            [
                str(NODE_RED),
                "--userDir",
                str(user_dir),
                "--settings",
                str(user_dir / "settings.js"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(user_dir)},
        )
        self._reader = threading.Thread(target=self._read, name="node-red-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._more:
                self.output.append(line.rstrip("\n"))
                self._more.notify_all()

    def wait_for_line(self, text: str, after: int, timeout: float) -> int:
        """Wait until a line after the first ``after`` holds ``text``; returns the line count."""

        def seen() -> bool:
            return any(text in line for line in self.output[after:])

        with self._more:
            if not self._more.wait_for(seen, timeout):
                raise AssertionError(f"node-red never said {text!r}:\n{self.log()}")
            return len(self.output)

    def log(self) -> str:
        return "\n".join(self.output[-40:])

    def request(self, method: str, path: str, body: Any = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Node-RED-Deployment-Type", "full")
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/flows") == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            try:
                code = self._process.wait(timeout=0.2)  # also notices an early exit
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"node-red exited with {code}:\n{self.log()}")
        raise AssertionError(f"node-red did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()


@pytest.fixture
def node_red(tmp_path: Path) -> Iterator[NodeRed]:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    if not NODE_RED.is_file():
        pytest.skip(f"Node-RED is not installed in {NODE_RED.parent}: scripts/install-node-red.sh")
    process = NodeRed(tmp_path / "node-red")
    try:
        process.wait_ready(60.0)
        yield process
    finally:
        process.stop()


def flow_for(broker: MosquittoProcess, topic_root: str) -> list[dict[str, Any]]:
    """The shipped flow pointed at the test broker and the test's topic root."""
    text = FLOW_FILE.read_text(encoding="utf-8").replace(ROOT, topic_root)
    nodes: list[dict[str, Any]] = json.loads(text)
    for node in nodes:
        if node["type"] == "mqtt-broker":
            node.update(broker=broker.host, port=str(broker.port))
    return nodes


@pytest.mark.broker
def test_real_node_red_confirms_a_prediction_the_broker_delivered(
    node_red: NodeRed, broker: MosquittoProcess, broker_settings: BrokerSettings, topic_root: str
) -> None:
    before = len(node_red.output)
    assert node_red.request("POST", "/flows", flow_for(broker, topic_root)) in (200, 204)
    started = node_red.wait_for_line("Started flows", before, 30.0)
    node_red.wait_for_line("Connected to broker", started - 1, 30.0)
    topics = Topics(topic_root)
    sender, _ = connect(broker_settings)
    watcher, confirmations = connect(broker_settings, [(topics.all_confirmation(), 1)])
    sent: dict[str, Prediction] = {}
    received = None
    try:
        # The flow's MQTT nodes connect and subscribe on their own time after the deploy: send a
        # prediction, press "confirm the latest", and wait for the confirmation; again until one
        # comes (a prediction sent before the subscription is lost, as MQTT says).
        deadline = time.monotonic() + 30.0
        while received is None and time.monotonic() < deadline:
            prediction = Prediction(
                prediction_id=uuid.uuid4().hex,
                device_id=DEVICE,
                window=WindowRef(batch_seq=len(sent), offset=0, length=80),
                label="Sitting",
                class_index=1,
                probabilities=(0.2, 0.8),
                model_version="v0007",
                ts=time.time(),
            )
            sent[prediction.prediction_id] = prediction
            sender.publish(
                Outbound(topics.prediction(DEVICE), codec.encode_prediction(prediction))
            ).wait(5.0)
            try:
                node_red.request("POST", "/inject/har-confirm-inject")
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"inject refused ({exc.code}):\n{node_red.log()}") from exc
            try:
                received = confirmations.get(timeout=1.0)
            except queue.Empty:  # not yet subscribed, or no prediction seen yet
                received = None
    finally:
        sender.stop()
        watcher.stop()
    assert received is not None, f"Node-RED published no confirmation:\n{node_red.log()}"
    assert received.topic == topics.confirmation(DEVICE)
    confirmation = codec.decode_confirmation(received.payload)
    assert confirmation.prediction_id in sent
    assert confirmation.label == "Sitting"
    assert confirmation.source == "user"
