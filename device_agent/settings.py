"""The device agent's settings: one frozen object built in ``main()`` and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from activity_model.loading import RUNTIMES, resolve_runtime
from device_agent.learning import LearningPolicy
from device_agent.sensors import SensorSettings
from shared import homeassistant
from shared.config import BrokerSettings
from shared.errors import ConfigError, ModelError
from shared.topics import is_valid_id

_LEARNING = LearningPolicy()  # the measured defaults


@dataclass(frozen=True, slots=True)
class AgentTuning:
    """Batching, buffering and learning knobs; the defaults suit a 20 Hz wearable."""

    # Settings of earlier versions, still accepted in a config file (and ignored).
    RETIRED: ClassVar[dict[str, str]] = {
        "alignment_prior": "the placement is now found without a prior; min_rotation_deg "
        "says which rotations are corrected (docs/model.md)",
    }

    batch_seconds: float = 1.0  # sensor time per published batch
    window_hop: int = 0  # samples between windows; 0 = half the model's window
    outbox_max_messages: int = 100_000  # about a day of batches at 1 s
    outbox_max_bytes: int = 256 * 1024 * 1024
    recent_windows: int = 4096  # predictions that can still be confirmed (~4.5 h at 4 s)
    replay_max_windows: int = 2000  # confirmed windows kept for learning and new versions
    # On-device learning (device_agent.learning.LearningPolicy; docs/model.md).
    min_rotation_deg: float = _LEARNING.min_rotation_deg
    learn_max_per_class: int = _LEARNING.max_per_class
    memory_tolerance: float = _LEARNING.memory_tolerance
    guard_window: int = _LEARNING.guard_window
    guard_margin: float = _LEARNING.guard_margin
    turned_margin: float = _LEARNING.turned_margin
    accept_margin: float = 0.05  # refuse an update worse than this on held-out confirmations
    min_replay_for_gate: int = 10  # fewer held-out confirmations: the local gate is skipped
    status_interval_s: float = 30.0
    publish_inflight: int = 50
    # End-to-end delivery (docs/protocol.md): a sensor batch, prediction or kept confirmation
    # leaves the outbox only when the trainer's receipt names it. One the broker took this long
    # ago, and no receipt named though a later one was named, is sent again, at most max_resends
    # times. Without a trainer that sends receipts, set await_receipts = false: the broker's
    # acknowledgement then suffices.
    await_receipts: bool = True
    receipt_timeout_s: float = 30.0
    max_resends: int = 10
    work_queue_size: int = 256
    inbox_size: int = 256
    shutdown_flush_s: float = 5.0
    # A model bundle larger than this (downloaded, or all its files inflated) is refused before
    # it is downloaded or inflated: 64 MiB is about 60 times the largest model here (1.1 MB),
    # and a device holds the download and the inflated files in memory together while verifying.
    max_model_bytes: int = 64 * 1024 * 1024
    # A download that gets no new chunk for this long is stalled: it asks the broker for the
    # retained chunks again, this many times, then waits for the next manifest.
    download_stall_s: float = 60.0
    download_retries: int = 3
    # While the store refuses writes (a full disk), sensor batches wait in memory this long
    # (in sensor time), retried with every new batch; older ones are dropped and counted.
    hold_unstored_s: float = 60.0
    # Publish retained Home Assistant MQTT discovery configs at start (docs/dashboards.md).
    homeassistant_discovery: bool = False
    homeassistant_prefix: str = homeassistant.DEFAULT_PREFIX
    # What runs the model: "tensorflow" (the SavedModel), "litert" (the bundle's LiteRT form,
    # for devices without TensorFlow) or "auto" (TensorFlow when it is installed, else LiteRT).
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"agent.runtime must be one of {', '.join(RUNTIMES)}")
        if not 0.05 <= self.batch_seconds <= 60:
            raise ConfigError("agent.batch_seconds must be within 0.05..60")
        if self.window_hop < 0:
            raise ConfigError("agent.window_hop must be >= 0")
        if min(self.outbox_max_messages, self.recent_windows, self.replay_max_windows) < 1:
            raise ConfigError("agent outbox/recent/replay sizes must be >= 1")
        if not 0 <= self.accept_margin <= 1:
            raise ConfigError("agent.accept_margin must be within 0..1")
        if not 1 <= self.publish_inflight <= 1000:
            raise ConfigError("agent.publish_inflight must be within 1..1000")
        if self.receipt_timeout_s <= 0 or self.max_resends < 0:
            raise ConfigError("agent.receipt_timeout_s must be > 0 and agent.max_resends >= 0")
        if self.max_model_bytes < 1024:
            raise ConfigError("agent.max_model_bytes must be >= 1024")
        if self.download_stall_s <= 0 or self.download_retries < 0:
            raise ConfigError("agent.download_stall_s must be > 0, agent.download_retries >= 0")
        if self.hold_unstored_s < 0:
            raise ConfigError("agent.hold_unstored_s must be >= 0")
        try:
            homeassistant.check_prefix(self.homeassistant_prefix)
        except ValueError as exc:
            raise ConfigError(f"agent.homeassistant_prefix: {exc}") from exc
        try:
            self.learning_policy()
        except ValueError as exc:
            raise ConfigError(f"agent learning settings: {exc}") from exc

    def model_runtime(self) -> str:
        """The runtime ``runtime`` means on this machine ("tensorflow" or "litert")."""
        try:
            return resolve_runtime(self.runtime)
        except ModelError as exc:
            raise ConfigError(f"agent.runtime: {exc}") from exc

    def learning_policy(self) -> LearningPolicy:
        return LearningPolicy(
            min_rotation_deg=self.min_rotation_deg,
            max_per_class=self.learn_max_per_class,
            memory_tolerance=self.memory_tolerance,
            guard_window=self.guard_window,
            guard_margin=self.guard_margin,
            turned_margin=self.turned_margin,
        )


@dataclass(frozen=True, slots=True)
class AgentSettings:
    device_id: str = ""
    state_dir: Path = Path("/var/lib/har/agent")
    model_dir: Path | None = None  # default: <state_dir>/models
    public_key: Path | None = None  # Ed25519 key model updates must be signed with
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    sensor: SensorSettings = field(default_factory=SensorSettings)
    agent: AgentTuning = field(default_factory=AgentTuning)

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ConfigError("device_id is required (config, HAR_DEVICE_ID or --device-id)")
        if not is_valid_id(self.device_id):
            raise ConfigError(
                f"device_id {self.device_id!r}: use 1-64 of A-Z a-z 0-9 _ . - "
                "(it becomes a topic level)"
            )
        if self.agent.homeassistant_discovery:
            try:
                homeassistant.check_node_id(self.device_id)
            except ValueError as exc:
                raise ConfigError(f"agent.homeassistant_discovery: {exc}") from exc

    @property
    def models_dir(self) -> Path:
        return self.model_dir or self.state_dir / "models"

    @property
    def store_path(self) -> Path:
        return self.state_dir / "agent.sqlite3"

    @property
    def learned_dir(self) -> Path:
        return self.state_dir / "learned"
