"""What a person sees of the ``har`` command: help, errors, redacted secrets, first-run hints."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from activity_model.tensorflow_import import LOAD_NOISE, native_log_level, without_lines
from device_agent.agent import DeviceAgent
from device_agent.sensors import SensorSettings, open_sensor
from device_agent.settings import AgentSettings
from har.cli import QUIET_UNLESS_DEBUG, main
from har.demo.data import WISDM_ENV, prepare
from har.local_broker import BrokerUsers, MosquittoProcess, free_port
from shared.config import BrokerSettings
from shared.errors import ConfigError, HarError
from shared.mqtt_transport import MqttConnection
from shared.signing import generate_keypair
from trainer_service.registry import ModelRegistry
from trainer_service.training import TrainConfig
from trainer_service.training import _progress as training_progress

REPO = Path(__file__).resolve().parent.parent
SECRET = "hunter2-not-for-print"


@pytest.fixture(autouse=True)
def own_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No HAR_* settings from whoever runs the tests, a folder of its own, and the logger levels
    ``main`` sets put back afterwards."""
    for name in list(os.environ):
        if name.startswith("HAR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    levels = {name: logging.getLogger(name).level for name in QUIET_UNLESS_DEBUG}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def run_har(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m har ARGUMENTS`` as a process, without the caller's HAR_* settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HAR_")}
    env["PYTHONPATH"] = str(REPO)
    env[WISDM_ENV] = ""
    return subprocess.run(
        [sys.executable, "-m", "har", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


def help_of(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*arguments, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def options_help(text: str) -> dict[str, str]:
    """Each long option's entry in a help text: its line and the more indented ones after it."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        starts = re.match(r"  (?:-\w, )?(--[\w-]+)", line)
        if starts:
            current = starts.group(1)
            entries[current] = line.strip()
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


# ------------------------------------------------------------------------------ secrets


def test_agent_show_config_redacts_the_broker_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "wrist-1"\n[broker]\nusername = "wrist-1"\npassword = "{SECRET}"\n'
    )
    assert main(["agent", "show-config", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert SECRET not in shown
    assert "password=<redacted>" in shown
    assert "username='wrist-1'" in shown  # the rest is still shown


def test_broker_settings_show_that_no_password_is_set_and_where_a_password_file_is() -> None:
    shown = repr(BrokerSettings(password_file=Path("/etc/har/broker.password")))
    assert "password=''" in shown
    assert "password_file=PosixPath('/etc/har/broker.password')" in shown


def test_broker_users_never_show_their_passwords() -> None:
    assert SECRET not in repr(BrokerUsers(passwords={"trainer": SECRET}, acl=""))


def test_a_refused_broker_user_is_reported_without_its_password(tmp_path: Path) -> None:
    # mosquitto_passwd refuses a user name with a colon (its file's separator).
    with pytest.raises(HarError, match="could not add user") as refused:
        MosquittoProcess(tmp_path, users=BrokerUsers(passwords={"a:b": SECRET}, acl=""))
    assert SECRET not in str(refused.value)


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("arguments", "prog"),
    [(["agent"], "har agent"), (["models", "list"], "har models list")],
)
def test_an_unknown_flag_is_reported_with_the_subcommands_usage(
    arguments: list[str], prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*arguments, "--frobnicate"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} ")
    assert f"{prog}: error: unrecognized arguments: --frobnicate" in err


def test_each_agent_action_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    rollback = help_of(capsys, "agent", "rollback")
    assert rollback.startswith("usage: har agent rollback ")
    assert "previously installed model version current" in rollback
    assert "--sensor" not in rollback  # running flags are not rollback's
    agent = help_of(capsys, "agent")
    assert "--sensor" in agent
    assert "rollback" in agent


def test_agent_flags_count_before_and_after_the_action(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    flags = ["--device-id", "wrist-7", "show-config", "--state-dir", str(state)]
    assert main(["agent", *flags]) == 0
    shown = capsys.readouterr().out
    assert "device_id='wrist-7'" in shown  # given before the action, not reset by it
    assert f"state_dir=PosixPath('{state}')" in shown


def test_demo_help_is_plain_text_and_names_every_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping
    text = help_of(capsys, "demo")
    assert "`" not in text, "reStructuredText markup in the help"
    options = options_help(text)
    options.pop("--help")
    assert len(options) == 11
    for option, entry in options.items():
        assert "(default: " in entry, option
    assert options["--timeout"].endswith("(default: 600)")
    assert options["--workdir"].endswith("(default: var/demo)")


def test_train_help_names_train_configs_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    options = options_help(help_of(capsys, "train"))
    cnn, lstm = TrainConfig(), TrainConfig.seed_lstm()
    # The help names one default for these: both architectures must share it.
    assert cnn.epochs == lstm.epochs
    assert cnn.batch_size == lstm.batch_size
    expected = {
        "--epochs": f"(default: {cnn.epochs})",
        "--seed": f"(default: {cnn.seed})",
        "--window": f"(default: {cnn.window}; seed-lstm: {lstm.window})",
        "--hop": f"(default: {cnn.hop}, or window/8 with --window; seed-lstm: {lstm.hop})",
        "--batch-size": f"(default: {cnn.batch_size})",
        "--learning-rate": f"(default: {cnn.learning_rate:g}; seed-lstm: {lstm.learning_rate:g})",
        "--device-anchor": f"(default: {cnn.device_anchor:g})",
        "--patience": f"(default: {cnn.patience})",
        "--width": f"(default: {cnn.width})",
        "--class-weighting": f"(default: {cnn.class_weighting})",
        "--arch": f"(default: {cnn.arch})",
    }
    for option, default in expected.items():
        assert options[option].endswith(default), options[option]


def test_data_download_without_a_checksum_names_both_ways_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "wisdm.tar.gz"
    # A URL nothing answers: the refusal must come before any download.
    assert main(["data", "download", "http://127.0.0.1:9/wisdm.tar.gz", str(dest)]) == 2
    assert "--sha256" in caplog.text
    assert "--allow-unverified" in caplog.text
    assert not dest.exists()


# ------------------------------------------------------------------------------ registry


def test_reading_a_registry_never_creates_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "typo"
    assert main(["models", "list", "--registry-dir", str(missing)]) == 2
    assert main(["models", "show", "v1", "--registry-dir", str(missing)]) == 2
    assert not missing.exists()
    assert f"no model registry in {missing}" in caplog.text
    with pytest.raises(ConfigError):
        ModelRegistry(missing, create=False)
    ModelRegistry(missing)  # what the trainer and import use: made on first use
    assert main(["models", "list", "--registry-dir", str(missing)]) == 0


def test_importing_something_that_is_not_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(ConfigError, match="is not a folder"):
        registry.add_copy(tmp_path / "missing", parent=None)
    assert registry.versions() == []
    assert [path.name for path in registry.root.iterdir()] == ["versions"]  # nothing left over


# ------------------------------------------------------------------------------ demo


def test_demo_with_device_users_but_synthetic_data_says_so(tmp_path: Path) -> None:
    with pytest.raises(HarError, match="--device-users 7,8,9 chooses users of real data"):
        prepare(tmp_path, ("a", "b", "c"), None, base_seconds=1.0, device_users=(7, 8, 9))


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--data", "missing.txt"], "--data missing.txt: no such file"),
        (["--device-users", "7,8,9"], "--device-users 7,8,9 chooses users of real data"),
    ],
)
def test_demo_checks_its_data_before_starting_anything(
    flags: list[str], said: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "demo"
    result = run_har("demo", "--workdir", str(workdir), *flags, cwd=tmp_path)
    assert result.returncode == 1
    assert said in result.stdout
    assert "mosquitto" not in result.stdout
    assert not (workdir / "broker").exists()  # the broker was never set up
    assert not (workdir / "keys").exists()


# ------------------------------------------------------------------------------ hints


class Records(logging.Handler):
    """Log records of one logger; ``seen`` is set once ``count`` records match ``wanted``."""

    def __init__(self, wanted: str, count: int) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()
        self._wanted, self._count = wanted, count

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if sum(self._wanted in r.getMessage() for r in self.records) >= self._count:
            self.seen.set()

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


def test_a_broker_that_never_answers_gets_one_hint() -> None:
    port = free_port()  # nothing listens there
    records = Records("cannot reach broker", 6)
    logger = logging.getLogger("shared.mqtt_transport")
    logger.addHandler(records)
    saved_level = logger.level
    logger.setLevel(logging.WARNING)
    settings = BrokerSettings(port=port, reconnect_min_s=0.01, reconnect_max_s=0.02)
    connection = MqttConnection(settings, client_id="hint-test", persistent_session=False)
    connection.start()
    try:
        assert records.seen.wait(30), records.messages()
    finally:
        connection.stop()
        logger.removeHandler(records)
        logger.setLevel(saved_level)
    messages = records.messages()
    hints = [i for i, text in enumerate(messages) if text.startswith("is a broker running")]
    assert len(hints) == 1, messages
    assert f"127.0.0.1:{port}" in messages[hints[0]]
    assert sum("cannot reach broker" in text for text in messages[: hints[0]]) == 3


def agent_settings(state_dir: Path, public_key: Path | None) -> AgentSettings:
    return AgentSettings(
        device_id="wrist-1",
        state_dir=state_dir,
        public_key=public_key,
        broker=BrokerSettings(port=free_port()),
        sensor=SensorSettings(kind="synthetic"),
    )


@pytest.mark.parametrize("with_key", [False, True])
def test_an_agent_without_a_public_key_says_it_accepts_no_model(
    with_key: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    public_key = generate_keypair(tmp_path / "keys")[1] if with_key else None
    settings = agent_settings(tmp_path / "state", public_key)
    with caplog.at_level(logging.WARNING, logger="device_agent.agent"):
        agent = DeviceAgent(settings, open_sensor(settings.sensor))
    agent.shutdown()  # never started: closes its store
    said = "this device will accept no model" in caplog.text
    assert said is not with_key


# ------------------------------------------------------------------------------ TensorFlow's log


# What TensorFlow says on import, export and load that no user can act on.
TENSORFLOW_NOISE = (
    "oneDNN",
    "cpu_feature_guard",
    "contains input name",
    "unsaved custom gradients",
)
EXPORT_AND_LOAD = """
import sys
from pathlib import Path
from har.cli import configure_logging
configure_logging(sys.argv[1])
from activity_model.loading import load_model
from simulator.tiny_model import export_tiny_version
folder = export_tiny_version(Path(sys.argv[2]), seed=1, steps=1)
load_model(folder / "saved_model")
"""


@pytest.mark.slow
def test_tensorflow_says_nothing_unless_the_log_level_is_debug(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TF_")}
    env["PYTHONPATH"] = str(REPO)
    said = {}
    for level in ("INFO", "DEBUG"):
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_AND_LOAD, level, str(tmp_path / level / "v1")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        said[level] = [noise for noise in TENSORFLOW_NOISE if noise in done.stderr]
    assert said["INFO"] == [], said
    assert "contains input name" in said["DEBUG"], said  # absl's lines, shown again
    assert "oneDNN" in said["DEBUG"] or "cpu_feature_guard" in said["DEBUG"], said  # native ones


def test_tensorflows_native_log_follows_the_tensorflow_logger() -> None:
    logger = logging.getLogger(f"{__name__}.tensorflow-alike")  # a logger of this test's own
    expected = {
        logging.DEBUG: "0",
        logging.INFO: "0",
        logging.WARNING: "1",
        logging.ERROR: "2",
        logging.CRITICAL: "3",
    }
    for level, native in expected.items():
        logger.setLevel(level)
        assert native_log_level(logger) == native


@pytest.mark.parametrize(
    ("level", "library_level"), [("INFO", logging.ERROR), ("DEBUG", logging.NOTSET)]
)
def test_tensorflows_loggers_are_quiet_unless_debug(level: str, library_level: int) -> None:
    assert main(["--log-level", level, "agent", "show-config", "--device-id", "w"]) == 0
    for name in QUIET_UNLESS_DEBUG:
        assert logging.getLogger(name).level == library_level


def test_the_load_noise_is_taken_out_of_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with without_lines(LOAD_NOISE):
        os.write(2, b"E0000 a real error\n")
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\n")
        os.write(2, b"W0000 a warning\n")
    assert capfd.readouterr().err == "E0000 a real error\nW0000 a warning\n"


def test_the_log_level_takes_any_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-level", "debug", "agent", "show-config", "--device-id", "w"]) == 0
    assert main(["--log-level", "Warning", "agent", "show-config", "--device-id", "w"]) == 0


# ------------------------------------------------------------------------------ har train


def test_the_training_progress_bar_stays_when_training_ends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = training_progress(3, True)
    bar.update(3)
    bar.close()
    err = capsys.readouterr().err
    assert err.endswith("\n")  # a bar that goes away ends with "\r" over a blanked line
    assert "3/3" in err.rsplit("\r", 1)[-1]
