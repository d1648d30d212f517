"""``har sim`` settings: one frozen object built from TOML < HAR_* environment < flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from activity_model.loading import RUNTIMES
from shared import homeassistant
from shared.config import BrokerSettings
from shared.errors import ConfigError
from shared.topics import is_valid_id

MAX_DEVICES = 10_000


@dataclass(frozen=True, slots=True)
class SimSettings:
    devices: int = 10
    # Device ids are <device_prefix><index, zero-padded to 4 digits>: sim-0000, sim-0001, ...
    device_prefix: str = "sim-"
    first_index: int = 0  # several sim processes share one fleet with disjoint index ranges
    # The trainer's Ed25519 public key: simulated devices, like real ones, install no model that
    # is not signed by it.
    public_key: Path | None = None
    # A WISDM-format file whose users the devices replay (round-robin); None: synthetic people.
    data_file: Path | None = None
    users: tuple[str, ...] = ()  # WISDM user ids to replay; empty: every user in the file
    synthetic_people: int = 12  # distinct synthetic wearers when there is no data file
    confirm_share: float = 0.2  # share of predictions a simulated person confirms or corrects
    mistake_rate: float = 0.05  # share of those answers that name the wrong activity
    speed: float = 1.0  # 1.0: real time; 10.0: ten times faster
    sample_rate_hz: float = 20.0
    batch_seconds: float = 1.0
    window_hop: int = 0  # samples between windows; 0 = half the model's window
    # Each device's status with its counters, in real seconds (the log line's: simulated ones).
    status_interval_s: float = 30.0
    outbox_max_messages: int = 1000  # per device, while the broker is unreachable
    # End-to-end delivery, as a real agent's (docs/protocol.md): a batch or prediction is kept
    # until the trainer's receipt names it, and sent again when none did within
    # receipt_timeout_s (real seconds). Without a trainer that sends receipts: false.
    await_receipts: bool = True
    receipt_timeout_s: float = 10.0
    seed: int = 0
    # Verified model releases, shared by every simulated device of this process.
    state_dir: Path = Path("var/sim")
    # The people's app: a separate connection that publishes confirmations. With the shipped
    # broker ACL devices may not confirm; the people's app logs in as "dashboard".
    app_username: str = ""
    app_password_file: Path | None = None
    # Retained Home Assistant discovery configs for every simulated device (docs/dashboards.md).
    homeassistant_discovery: bool = False
    homeassistant_prefix: str = homeassistant.DEFAULT_PREFIX
    # What runs the model: "auto" takes LiteRT when it is installed (one process holds many
    # devices, and LiteRT needs a tenth of TensorFlow's memory), else TensorFlow.
    runtime: str = "auto"
    broker: BrokerSettings = field(default_factory=BrokerSettings)

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise ConfigError(f"devices must be within 1..{MAX_DEVICES}")
        if self.first_index < 0:
            raise ConfigError("first_index must be >= 0")
        if not is_valid_id(self.device_id(self.first_index + self.devices - 1)):
            raise ConfigError(f"device_prefix {self.device_prefix!r} does not make valid ids")
        for name in ("confirm_share", "mistake_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be within 0..1")
        if not 0.01 <= self.speed <= 1000:
            raise ConfigError("speed must be within 0.01..1000")
        if not 0.05 <= self.batch_seconds <= 60:
            raise ConfigError("batch_seconds must be within 0.05..60")
        if not 1 <= self.sample_rate_hz <= 1000:
            raise ConfigError("sample_rate_hz must be within 1..1000")
        if not 0.1 <= self.status_interval_s <= 86_400:
            raise ConfigError("status_interval_s must be within 0.1..86400")
        if self.window_hop < 0 or self.synthetic_people < 1 or self.outbox_max_messages < 1:
            raise ConfigError("window_hop must be >= 0, synthetic_people and outbox >= 1")
        for user in self.users:
            if not user.strip().isdigit():
                raise ConfigError(f"users: {user!r} is not a WISDM user id")
        self._check_runtime_and_homeassistant()

    def _check_runtime_and_homeassistant(self) -> None:
        if not 0.5 <= self.receipt_timeout_s <= 86_400:  # and delivery
            raise ConfigError("receipt_timeout_s must be within 0.5..86400")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}")
        if not self.homeassistant_discovery:
            return
        try:
            homeassistant.check_prefix(self.homeassistant_prefix)
            homeassistant.check_node_id(self.device_id(self.first_index))
        except ValueError as exc:
            raise ConfigError(f"homeassistant_discovery: {exc}") from exc

    def device_id(self, index: int) -> str:
        return f"{self.device_prefix}{index:04d}"

    @property
    def device_ids(self) -> list[str]:
        return [self.device_id(i) for i in range(self.first_index, self.first_index + self.devices)]

    @property
    def batch_samples(self) -> int:
        return max(1, round(self.sample_rate_hz * self.batch_seconds))
