"""Settings of ``har watch`` and ``har confirm``: a ``[broker]`` table and a few timeouts.

A TOML file holds ``[broker]`` as for the agent and the trainer, plus optional top-level keys
below; ``HAR_BROKER_*`` and ``HAR_<FIELD>`` environment variables and flags override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import BrokerSettings
from shared.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    connect_timeout_s: float = 10.0  # for the first connection
    ack_timeout_s: float = 10.0  # for the broker's acknowledgement of a confirmation
    manifest_wait_s: float = 3.0  # for the retained model manifest (`har confirm`)
    predictions_per_device: int = 512  # kept for joining confirmations to them

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.ack_timeout_s, self.manifest_wait_s) <= 0:
            raise ConfigError("dashboard timeouts must be > 0")
        if self.predictions_per_device < 1:
            raise ConfigError("predictions_per_device must be >= 1")
