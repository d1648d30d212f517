"""Test brokers: the local Mosquitto process (``har.local_broker``) or the compose container."""

from __future__ import annotations

from har.local_broker import (
    LOOPBACK,
    BrokerUsers,
    MosquittoProcess,
    accepts_connections,
    find_mosquitto,
    free_port,
)

__all__ = [
    "LOOPBACK",
    "BrokerUsers",
    "ComposeBroker",
    "MosquittoProcess",
    "accepts_connections",
    "find_mosquitto",
    "free_port",
]


class ComposeBroker:
    """The eclipse-mosquitto container of deploy/docker-compose.yml, driven by pytest-docker."""

    def __init__(self, services: object, host: str, port: int) -> None:
        self._services = services
        self.host = host
        self.port = port

    @property
    def running(self) -> bool:
        return accepts_connections(self.host, self.port)

    def start(self, timeout: float = 30.0) -> None:
        self._compose("start mosquitto")
        self._services.wait_until_responsive(  # type: ignore[attr-defined]
            check=lambda: accepts_connections(self.host, self.port), timeout=timeout, pause=0.1
        )

    def stop(self, timeout: float = 30.0) -> None:
        self._compose("stop mosquitto")

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return ""

    def _compose(self, command: str) -> None:
        self._services._docker_compose.execute(command)  # type: ignore[attr-defined]
