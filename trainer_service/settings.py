"""The trainer service's settings: one frozen object built in ``main()`` and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.config import BrokerSettings, read_secret_file, redact_url
from shared.errors import ConfigError
from shared.topics import is_valid_id


@dataclass(frozen=True, slots=True)
class RetrainSettings:
    min_new_confirmations: int = 200  # retrain once this many new confirmed windows are joined
    interval_s: float = 3600.0  # ... or this long after the last retrain, if any arrived (0: off)
    confirmed_weight: float = 3.0  # loss weight of a device-confirmed window vs a base window
    epochs: int = 8  # fine-tuning epochs from the current model
    initial_epochs: int = 40  # training from scratch (no current model, or a new label set)
    patience: int = 3
    learning_rate: float = 3e-4  # fine-tuning step size (training from scratch uses 1e-3)
    gate_margin: float = 0.0  # a candidate may be this much worse and still be promoted
    holdout_every: int = 5  # 1 in N confirmations (stable, by id) is kept for evaluation only
    holdout_days: float = 30.0  # ... and only recent ones count as "recent confirmations"
    arch: str = "cnn"  # architecture when training from scratch
    seed: int = 0
    # CPU niceness of the retrain process (0-19): ingest keeps the CPU first while it trains.
    nice: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise ConfigError("retrain.nice must be within 0..19")
        if self.min_new_confirmations < 1:
            raise ConfigError("retrain.min_new_confirmations must be >= 1")
        if self.confirmed_weight <= 0:
            raise ConfigError("retrain.confirmed_weight must be > 0")
        if self.holdout_every < 2:
            raise ConfigError("retrain.holdout_every must be >= 2")
        if min(self.epochs, self.initial_epochs, self.patience) < 1:
            raise ConfigError("retrain epochs and patience must be >= 1")


@dataclass(frozen=True, slots=True)
class PublishSettings:
    # Data bytes per retained model chunk: keep it below the broker's max_packet_size (1 MiB in
    # deploy/mosquitto/mosquitto.conf) minus a few KiB for the header, topic and properties.
    chunk_bytes: int = 256 * 1024
    ack_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1024 <= self.chunk_bytes <= 64 * 1024 * 1024:
            raise ConfigError("publish.chunk_bytes must be within 1 KiB..64 MiB")


@dataclass(frozen=True, slots=True)
class IngestSettings:
    # Inbound queue size, and the MQTT 5 Receive Maximum: the broker never has more messages
    # in flight to us than this queue holds.
    queue_size: int = 1000
    commit_batch: int = 200  # messages committed per transaction at most
    shared_group: str = "trainers"  # $share/<group>/...: trainer processes split the load
    known_devices: tuple[str, ...] = ()  # empty: accept every well-formed device id
    # How long the broker keeps this trainer's session (and queues its share of the messages)
    # while it is away. One trainer: long, a restart finds everything queued. Replicas: short
    # (e.g. 10), because Mosquitto keeps handing a dead replica its share of a $share group
    # until its session expires; what was queued there is then dropped, and comes again from
    # the devices, which resend what no receipt named (deploy/README.md, "Scaling out").
    session_expiry_s: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if not 1 <= self.queue_size <= 65535:
            raise ConfigError("ingest.queue_size must be within 1..65535")
        if not 1 <= self.session_expiry_s <= 0xFFFFFFFE:
            raise ConfigError("ingest.session_expiry_s must be within 1..4294967294")
        if not is_valid_id(self.shared_group):
            raise ConfigError("ingest.shared_group must be a valid id")


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    # Raw data costs about 260 bytes a second per device at 20 Hz (22 MB a day): these bound it.
    max_age_days: float = 30.0  # sensor batches and predictions older than this are deleted
    max_batches_per_device: int = 2_592_000  # ... and never more than 30 days of 1 s batches
    interval_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    # "" (the default): SQLite in data_dir. "sqlite:///ABSOLUTE/PATH", or
    # "postgresql://USER@HOST:PORT/DB" for several trainer replicas on one database.
    url: str = ""
    password_file: Path | None = None  # the PostgreSQL password, kept out of the URL

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ConfigError(
                f"store.url {redact_url(self.url)!r} must start with sqlite:// or postgresql://"
            )

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never a password from the URL.
        return f"StoreSettings(url={redact_url(self.url)!r}, password_file={self.password_file!r})"

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return read_secret_file(self.password_file, "store.password_file")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    port: int = 0  # the Prometheus endpoint http://<host>:<port>/metrics (0: off)
    host: str = "127.0.0.1"  # loopback unless the operator opens it

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("metrics.port must be within 0..65535 (0: off)")
        if not self.host:
            raise ConfigError("metrics.host must not be empty")


@dataclass(frozen=True, slots=True)
class TrainerSettings:
    instance: str = "trainer-1"
    data_dir: Path = Path("/var/lib/har/data")
    registry_dir: Path = Path("/var/lib/har/registry")
    private_key: Path | None = None
    base_data: Path | None = None  # WISDM-format base training set
    status_interval_s: float = 30.0
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    store: StoreSettings = field(default_factory=StoreSettings)

    def __post_init__(self) -> None:
        if not is_valid_id(self.instance):
            raise ConfigError(f"instance {self.instance!r} must be a valid id (a topic level)")

    @property
    def store_path(self) -> Path:
        """The default SQLite file (used when ``store.url`` is empty)."""
        return self.data_dir / "trainer.sqlite3"

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite://{self.store_path.absolute()}"
