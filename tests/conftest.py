"""Shared fixtures: a real Mosquitto broker per test, a topic root per test, MQTT test clients, a
real PostgreSQL server per session (a database per test), and stores of both kinds."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.agent import DeviceAgent
from device_agent.sensors import open_sensor
from device_agent.settings import AgentSettings
from har.local_postgres import PostgresProcess, find_postgres_bindir
from shared.config import BrokerSettings
from simulator.tiny_model import Releases, make_releases
from tests.agent_helpers import AgentFactory
from tests.mosquitto import BrokerUsers, ComposeBroker, MosquittoProcess, accepts_connections
from trainer_service.store import Store
from trainer_service.stores import open_store

REPO_ROOT = Path(__file__).resolve().parent.parent
USE_DOCKER = os.environ.get("HAR_TEST_DOCKER") == "1"


def _docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    import subprocess

    result = subprocess.run(["docker", "info"], capture_output=True, check=False)
    return result.returncode == 0


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(REPO_ROOT / "deploy" / "docker-compose.yml")


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # Only the broker: the trainer image is not needed to test the wire.
    return ["up --build -d mosquitto"]


@pytest.fixture
def broker_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., MosquittoProcess | ComposeBroker]]:
    """Start a broker; ``users=BrokerUsers(...)`` turns on passwords and an ACL."""
    started: list[MosquittoProcess] = []

    def start(users: BrokerUsers | None = None) -> MosquittoProcess | ComposeBroker:
        if USE_DOCKER and users is None:
            if not _docker_engine_available():
                pytest.fail("HAR_TEST_DOCKER=1 but no Docker engine answers `docker info`")
            services = request.getfixturevalue("docker_services")
            docker_ip = request.getfixturevalue("docker_ip")
            port = services.port_for("mosquitto", 1883)
            broker = ComposeBroker(services, docker_ip, port)
            services.wait_until_responsive(
                check=lambda: accepts_connections(docker_ip, port), timeout=30.0, pause=0.1
            )
            return broker
        process = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"), users=users)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoProcess | ComposeBroker]) -> MosquittoProcess:
    return broker_factory()  # type: ignore[return-value]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProcess]:
    """One PostgreSQL server for the session (about 2 s to start), on a free loopback port."""
    if find_postgres_bindir() is None:
        pytest.skip(
            "PostgreSQL's initdb/postgres are not installed (scripts/setup.sh installs them)"
        )
    pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")
    server = PostgresProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresProcess) -> str:
    """A fresh, empty database of its own for the test."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store contract runs against both backends: a new SQLite file, a new database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'store' / 't.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_store(store_url: str) -> Iterator[Callable[..., Store]]:
    """Opens the test's store (again, if called again); closes every one it opened."""
    opened: list[Store] = []

    def make(**kwargs: object) -> Store:
        store = open_store(store_url, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()  # closing twice is harmless


@pytest.fixture
def topic_root() -> str:
    """A root of its own for every test, so retained messages never leak between tests."""
    return f"test/{uuid.uuid4().hex[:12]}/har/v1"


@pytest.fixture
def broker_settings(broker: MosquittoProcess, topic_root: str) -> BrokerSettings:
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        topic_root=topic_root,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


@pytest.fixture
def inbox() -> queue.Queue[object]:
    return queue.Queue(maxsize=1000)


_OUR_THREADS = ("agent-", "trainer-", "paho-", "sensor-", "sim-")


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    """Fail a test that leaves one of our threads running: it forgot a shutdown or a stop."""
    before = set(threading.enumerate())
    yield
    leftovers = [
        thread
        for thread in threading.enumerate()
        if thread not in before and thread.name.startswith(_OUR_THREADS)
    ]
    for thread in leftovers:
        thread.join(timeout=10)
    alive = [thread.name for thread in leftovers if thread.is_alive()]
    assert not alive, f"threads left running after the test: {alive}"


class _ExceptionRecords(logging.Handler):
    """Keeps every record that carries a traceback or is critical, from whatever thread."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.expected = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None or record.levelno >= logging.CRITICAL:
            self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_logged_exceptions() -> Iterator[_ExceptionRecords]:
    """Fail a test during which any thread logged an exception (as Home Assistant's tests do):
    a loop that catches a bug and carries on must not hide it from the suite."""
    handler = _ExceptionRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
    described = [
        f"{record.threadName}: {record.name}: {record.getMessage()}" for record in handler.records
    ]
    assert handler.expected or not described, f"exceptions were logged during the test: {described}"


@pytest.fixture
def logged_exceptions(fail_on_logged_exceptions: _ExceptionRecords) -> list[logging.LogRecord]:
    """For a test that provokes logged exceptions on purpose: they are its to assert on."""
    fail_on_logged_exceptions.expected = True
    return fail_on_logged_exceptions.records


# ------------------------------------------------------- device agents (tests/agent_helpers.py)
@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("releases"))


@pytest.fixture
def start_agent() -> Iterator[AgentFactory]:
    running: list[DeviceAgent] = []

    def start(settings: AgentSettings) -> DeviceAgent:
        agent = DeviceAgent(settings, open_sensor(settings.sensor))
        agent.start()
        running.append(agent)
        return agent

    yield start
    for agent in running:
        agent.shutdown()
