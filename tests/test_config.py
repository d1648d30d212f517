"""Settings layering (shared/config.py) and topic names (shared/topics.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.config import BrokerSettings, load_settings, read_toml
from shared.errors import ConfigError
from shared.topics import DEFAULT_ROOT, Topics, is_valid_id

# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """A small settings tree shaped like the agent's: top-level fields plus [broker]."""

    device_id: str = "dev-0"
    state_dir: Path = Path("/var/lib/har")
    public_key: Path | None = None
    speed: float = 1.0
    window_hop: int = 40
    verbose: bool = False
    labels: tuple[str, ...] = ("Sitting", "Walking")
    broker: BrokerSettings = field(default_factory=BrokerSettings)


@dataclass(frozen=True, slots=True)
class Checked:
    """Settings whose own validation raises ValueError, as a plain dataclass might."""

    window_hop: int = 40

    def __post_init__(self) -> None:
        if self.window_hop <= 0:
            raise ValueError("window_hop must be positive")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_layer() -> None:
    settings = load_settings(ToolSettings)
    assert settings == ToolSettings()
    assert settings.broker.topic_root == DEFAULT_ROOT


def test_precedence_toml_then_environment_then_overrides(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        'device_id = "from-toml"\nspeed = 2.0\nwindow_hop = 20\n'
        '[broker]\nhost = "toml.lan"\nport = 1884\nusername = "toml-user"\n',
    )
    environ = {"HAR_SPEED": "3.5", "HAR_BROKER_HOST": "env.lan", "HAR_BROKER_PORT": "1885"}
    overrides = {"broker.host": "flag.lan", "window_hop": None}  # None: flag not given

    settings = load_settings(ToolSettings, config_file=config, environ=environ, overrides=overrides)

    assert settings.device_id == "from-toml"  # only in TOML
    assert settings.speed == 3.5  # env beats TOML
    assert settings.broker.port == 1885  # env beats TOML
    assert settings.broker.host == "flag.lan"  # flag beats env and TOML
    assert settings.window_hop == 20  # a flag left at None does not erase TOML
    assert settings.broker.username == "toml-user"
    assert settings.verbose is False  # untouched default


def test_environment_ignored_unless_given_and_prefix_is_respected() -> None:
    environ = {"HAR_SPEED": "9", "OTHER_SPEED": "7"}
    assert load_settings(ToolSettings).speed == 1.0
    assert load_settings(ToolSettings, environ=environ).speed == 9.0
    assert load_settings(ToolSettings, environ=environ, env_prefix="OTHER_").speed == 7.0


def test_environment_text_is_converted_per_type() -> None:
    settings = load_settings(
        ToolSettings,
        environ={
            "HAR_VERBOSE": "yes",
            "HAR_BROKER_TLS": "off",
            "HAR_LABELS": "Sitting, Standing ,Walking",
            "HAR_STATE_DIR": "~/har-state",
            "HAR_BROKER_KEEPALIVE_S": "60",
        },
    )
    assert settings.verbose is True
    assert settings.broker.tls is False
    assert settings.labels == ("Sitting", "Standing", "Walking")
    assert settings.state_dir == Path.home() / "har-state"  # ~ expanded
    assert settings.broker.keepalive_s == 60


def test_optional_path_from_empty_environment_is_none(tmp_path: Path) -> None:
    config = write(tmp_path, 'public_key = "/etc/har/model-signing.pub"\n')
    from_toml = load_settings(ToolSettings, config_file=config)
    assert from_toml.public_key == Path("/etc/har/model-signing.pub")
    # An empty variable unsets an optional path set by the file (e.g. HAR_BROKER_CA_FILE=).
    cleared = load_settings(ToolSettings, config_file=config, environ={"HAR_PUBLIC_KEY": ""})
    assert cleared.public_key is None
    assert load_settings(ToolSettings, environ={"HAR_BROKER_CA_FILE": ""}).broker.ca_file is None


def test_empty_environment_for_a_required_field_is_an_empty_value_not_none() -> None:
    # Only optional fields turn "" into None; a str field really becomes "".
    assert load_settings(ToolSettings, environ={"HAR_BROKER_USERNAME": ""}).broker.username == ""


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("devise_id = 'x'\n", "unknown setting 'devise_id' in config file"),
        ("[broker]\nhots = 'x'\n", "unknown setting 'broker.hots' in config file"),
        ("[brokers]\nhost = 'x'\n", "unknown setting 'brokers' in config file"),
        ("broker = 'mqtt.lan'\n", "setting 'broker' must be a table"),
    ],
)
def test_unknown_keys_and_misplaced_tables_are_errors(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(ToolSettings, config_file=write(tmp_path, toml))


def test_a_retired_setting_in_a_config_file_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent.toml from before an upgrade still starts the agent."""
    from device_agent.settings import AgentSettings

    path = tmp_path / "agent.toml"
    path.write_text('device_id = "w1"\n[agent]\nalignment_prior = 2.0\nguard_margin = 3.0\n')
    with caplog.at_level("WARNING", logger="shared.config"):
        settings = load_settings(AgentSettings, config_file=path)
    assert settings.agent.guard_margin == 3.0
    assert "'agent.alignment_prior' is retired and ignored" in caplog.text
    path.write_text('device_id = "w1"\n[agent]\nalignment_priors = 2.0\n')  # a typo stays one
    with pytest.raises(ConfigError, match=r"unknown setting 'agent\.alignment_priors'"):
        load_settings(AgentSettings, config_file=path)


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown setting 'broker.hots'")):
        load_settings(ToolSettings, overrides={"broker.hots": "x"})


def test_unknown_environment_variables_are_ignored() -> None:
    # The environment holds many HAR_* variables of other tools; only known names are read.
    assert load_settings(ToolSettings, environ={"HAR_NOT_A_SETTING": "1"}) == ToolSettings()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HAR_BROKER_PORT": "eighteen"}, "setting HAR_BROKER_PORT: invalid literal"),
        ({"HAR_VERBOSE": "maybe"}, "setting HAR_VERBOSE: expected true/false, got 'maybe'"),
        ({"HAR_SPEED": "fast"}, "setting HAR_SPEED: could not convert"),
    ],
)
def test_environment_type_errors_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(ToolSettings, environ=environ)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("window_hop = 1.5\n", "setting window_hop: expected an integer, got 1.5"),
        ("window_hop = true\n", "setting window_hop: expected an integer, got True"),
        ("speed = true\n", "setting speed: expected a number, got True"),
        ("device_id = ['a']\n", "setting device_id: expected a string, got ['a']"),
        ("labels = 3\n", "setting labels: expected a list, got 3"),
        ("[broker]\ntls = 'sometimes'\n", "setting broker.tls: expected true/false"),
    ],
)
def test_toml_type_errors_name_the_setting(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(ToolSettings, config_file=write(tmp_path, toml))


def test_integral_float_is_accepted_for_an_int(tmp_path: Path) -> None:
    settings = load_settings(ToolSettings, config_file=write(tmp_path, "window_hop = 20.0\n"))
    assert settings.window_hop == 20
    assert isinstance(settings.window_hop, int)


def test_validation_in_the_settings_class_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match=r"broker\.port 0 outside 1\.\.65535"):
        load_settings(ToolSettings, environ={"HAR_BROKER_PORT": "0"})
    with pytest.raises(ConfigError, match="reconnect_min_s"):
        load_settings(
            ToolSettings, overrides={"broker.reconnect_min_s": 5, "broker.reconnect_max_s": 1}
        )
    with pytest.raises(ConfigError, match="invalid settings Checked: window_hop must be positive"):
        load_settings(Checked, environ={"HAR_WINDOW_HOP": "-1"})


def test_unsupported_field_type_is_reported() -> None:
    @dataclass(frozen=True)
    class Odd:
        ratio: complex = 1j

    with pytest.raises(ConfigError, match="setting ratio: unsupported type"):
        load_settings(Odd, overrides={"ratio": 2j})


def test_read_toml_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_toml(write(tmp_path, "port = = 1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(ToolSettings, config_file=tmp_path / "missing.toml")


# ------------------------------------------------------------------------------ password file


def test_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "broker.password"
    secret.write_text("s3cret \n", encoding="utf-8")
    settings = load_settings(ToolSettings, environ={"HAR_BROKER_PASSWORD_FILE": str(secret)})
    assert settings.broker.password_file == secret
    assert settings.broker.password == ""
    assert settings.broker.resolved_password() == "s3cret"


def test_plain_password_is_used_without_a_file() -> None:
    settings = load_settings(ToolSettings, overrides={"broker.password": "pw"})
    assert settings.broker.resolved_password() == "pw"


def test_password_and_password_file_together_are_refused(tmp_path: Path) -> None:
    config = write(tmp_path, '[broker]\npassword = "pw"\npassword_file = "/etc/har/pw"\n')
    with pytest.raises(ConfigError, match="not both"):
        load_settings(ToolSettings, config_file=config)


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    settings = BrokerSettings(password_file=tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"cannot read broker\.password_file"):
        settings.resolved_password()


# ------------------------------------------------------------------------------ topics

TOPICS = Topics()


def test_builders_spell_the_documented_topics() -> None:
    assert TOPICS.sensor("wrist-0001") == "har/v1/devices/wrist-0001/sensor"
    assert TOPICS.prediction("wrist-0001") == "har/v1/devices/wrist-0001/prediction"
    assert TOPICS.confirmation("wrist-0001") == "har/v1/devices/wrist-0001/confirmation"
    assert TOPICS.status("wrist-0001") == "har/v1/devices/wrist-0001/status"
    assert TOPICS.error("wrist-0001") == "har/v1/devices/wrist-0001/error"
    assert TOPICS.all_sensor() == "har/v1/devices/+/sensor"
    assert TOPICS.all_prediction() == "har/v1/devices/+/prediction"
    assert TOPICS.all_confirmation() == "har/v1/devices/+/confirmation"
    assert TOPICS.all_status() == "har/v1/devices/+/status"
    assert TOPICS.all_error() == "har/v1/devices/+/error"
    assert TOPICS.model_manifest() == "har/v1/model/manifest"
    assert TOPICS.model_chunk("v0007", 3) == "har/v1/model/v0007/chunk/3"
    assert TOPICS.model_chunks("v0007") == "har/v1/model/v0007/chunk/+"
    assert TOPICS.trainer_status("trainer-1") == "har/v1/trainer/trainer-1/status"
    assert TOPICS.trainer_error() == "har/v1/trainer/error"
    assert TOPICS.trainer_command() == "har/v1/trainer/command"
    assert Topics("site-a/har/v1").sensor("d1") == "site-a/har/v1/devices/d1/sensor"


@pytest.mark.parametrize(
    "bad_id",
    ["", "-leading-dash", ".hidden", "_x", "a/b", "a+b", "a#b", "has space", "x" * 65, "é", "a\0"],
)
def test_invalid_ids_are_rejected_by_every_builder(bad_id: str) -> None:
    assert not is_valid_id(bad_id)
    for build in (TOPICS.sensor, TOPICS.status, TOPICS.model_chunks, TOPICS.trainer_status):
        with pytest.raises(ValueError, match="invalid"):
            build(bad_id)
    with pytest.raises(ValueError, match="invalid model version"):
        TOPICS.model_chunk(bad_id, 0)


def test_negative_chunk_index_is_rejected() -> None:
    with pytest.raises(ValueError, match="chunk index"):
        TOPICS.model_chunk("v1", -1)


@pytest.mark.parametrize("root", ["", "/har/v1", "har/v1/", "har/+/v1", "har/#", "har\0v1"])
def test_invalid_roots_are_rejected(root: str) -> None:
    with pytest.raises(ValueError, match="topic root"):
        Topics(root)


@pytest.mark.parametrize(
    "topic",
    [
        "har/v1/devices/wrist-0001",  # too short
        "har/v1/devices/wrist-0001/sensor/extra",  # too long
        "har/v1/devices/+/sensor",  # a filter, not a topic
        "other/v1/devices/wrist-0001/sensor",  # another root
        "har/v1/devices//sensor",
        "har/v1/model/manifest",
    ],
)
def test_device_of_rejects_non_device_topics(topic: str) -> None:
    assert TOPICS.device_of(topic) is None
    assert TOPICS.kind_of(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "har/v1/model/manifest",
        "har/v1/model/v1/chunk/x",
        "har/v1/model/v1/chunk/-1",
        "har/v1/model/v1/chunk/",
        "har/v1/model/v1/part/0",
        "har/v1/model/v1/chunk/0/extra",
        "har/v1/model/+/chunk/0",
        "har/v2/model/v1/chunk/0",
    ],
)
def test_chunk_of_rejects_other_topics(topic: str) -> None:
    assert TOPICS.chunk_of(topic) is None


# Ids exactly as the contract allows them, and arbitrary text for the negative properties.
valid_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
roots = st.lists(
    st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True), min_size=1, max_size=4
).map("/".join)
KINDS = ("sensor", "prediction", "confirmation", "status", "error")


@given(root=roots, device_id=valid_ids, kind=st.sampled_from(KINDS))
def test_device_topics_round_trip(root: str, device_id: str, kind: str) -> None:
    topics = Topics(root)
    topic = getattr(topics, kind)(device_id)
    assert topics.device_of(topic) == device_id
    assert topics.kind_of(topic) == kind
    assert topic.startswith(f"{root}/devices/")


@given(device_id=valid_ids)
def test_device_of_sensor_is_identity(device_id: str) -> None:
    assert TOPICS.device_of(TOPICS.sensor(device_id)) == device_id


@given(version=valid_ids, index=st.integers(0, 10**6))
def test_chunk_topics_round_trip(version: str, index: int) -> None:
    assert TOPICS.chunk_of(TOPICS.model_chunk(version, index)) == (version, index)


@given(text=st.text(max_size=80))
def test_is_valid_id_matches_the_documented_alphabet(text: str) -> None:
    expected = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", text, flags=re.ASCII)
    assert is_valid_id(text) == (expected is not None)
    if expected is None:
        with pytest.raises(ValueError, match="invalid device id"):
            TOPICS.sensor(text)


@given(topic=st.text(max_size=120))
def test_parsers_never_raise_and_only_return_valid_ids(topic: str) -> None:
    device = TOPICS.device_of(topic)
    assert device is None or is_valid_id(device)
    chunk = TOPICS.chunk_of(topic)
    assert chunk is None or (is_valid_id(chunk[0]) and chunk[1] >= 0)


def test_an_empty_required_path_is_an_error_not_the_current_directory() -> None:
    from device_agent.settings import AgentSettings

    with pytest.raises(ConfigError, match="HAR_STATE_DIR is set but empty"):
        load_settings(AgentSettings, environ={"HAR_DEVICE_ID": "d1", "HAR_STATE_DIR": ""})


def test_flags_may_pass_paths_as_path_objects(tmp_path: Path) -> None:
    settings = load_settings(
        ToolSettings, overrides={"state_dir": tmp_path, "public_key": tmp_path}
    )
    assert settings.state_dir == tmp_path
    assert settings.public_key == tmp_path
