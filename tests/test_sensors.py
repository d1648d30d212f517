"""Sensor sources: IIO against a fake sysfs tree, WISDM replay, synthetic data, CSV on a stream."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.sensors import (
    IioAccelerometer,
    MalformedLineError,
    SensorReading,
    SensorSettings,
    SensorSource,
    StdinCsv,
    SyntheticAccelerometer,
    WisdmReplay,
    find_iio_accelerometer,
    open_sensor,
    parse_csv_line,
)
from shared.config import load_settings
from shared.errors import ConfigError, DataError
from shared.messages import MAX_ABS_ACCELERATION

WAIT_S = 5.0  # upper bound for anything that should happen "promptly"; never slept


@pytest.fixture(autouse=True)
def no_reader_threads_left() -> Iterator[None]:
    """Like Home Assistant's harness: a test must not leave a reader thread behind."""
    yield
    for thread in threading.enumerate():
        if thread.name == "sensor-stdin-reader":
            thread.join(WAIT_S)
            assert not thread.is_alive(), "a StdinCsv reader thread outlived its test"


def read_in_thread(
    source: SensorSource, stop: threading.Event, max_samples: int = 10
) -> tuple[threading.Thread, queue.Queue[list[SensorReading]]]:
    results: queue.Queue[list[SensorReading]] = queue.Queue()
    thread = threading.Thread(target=lambda: results.put(source.read(stop, max_samples)))
    thread.start()
    return thread, results


def read_n(source: SensorSource, n: int, max_samples: int = 7) -> list[SensorReading]:
    """Exactly ``n`` readings, read in chunks (so chunking is exercised too)."""
    stop = threading.Event()
    out: list[SensorReading] = []
    while len(out) < n:
        got = source.read(stop, min(max_samples, n - len(out)))
        assert got, "source ended early"
        out.extend(got)
    return out


class EventOnLog(logging.Handler):
    """Sets ``event`` when a record whose message contains ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.fixture
def log_event() -> Iterator[Callable[[str], threading.Event]]:
    logger = logging.getLogger("device_agent.sensors")
    handlers: list[EventOnLog] = []
    old_level = logger.level
    logger.setLevel(logging.DEBUG)

    def watch(text: str) -> threading.Event:
        handler = EventOnLog(text)
        logger.addHandler(handler)
        handlers.append(handler)
        return handler.event

    yield watch
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


# --- IIO -------------------------------------------------------------------------------------


@dataclass
class FakeIio:
    """An ``iio:deviceN`` directory as the kernel lays it out, written by the test."""

    root: Path
    number: int = 0
    name: str = "lis3dh"
    raw: tuple[int, int, int] = (0, 0, 0)
    attributes: dict[str, str] = field(default_factory=lambda: {"in_accel_scale": "0.5"})

    @property
    def path(self) -> Path:
        return self.root / f"iio:device{self.number}"

    def create(self) -> FakeIio:
        self.path.mkdir(parents=True)
        (self.path / "name").write_text(self.name + "\n")
        for axis, raw_value in zip("xyz", self.raw, strict=True):
            self.set_raw(axis, raw_value)
        for attribute, text in self.attributes.items():
            (self.path / attribute).write_text(text + "\n")
        return self

    def set_raw(self, axis: str, value: int | str) -> None:
        (self.path / f"in_accel_{axis}_raw").write_text(f"{value}\n")


def test_iio_value_is_raw_plus_offset_times_scale(tmp_path: Path) -> None:
    device = FakeIio(
        tmp_path,
        raw=(10, -20, 30),
        attributes={"in_accel_scale": "0.5", "in_accel_z_scale": "0.25", "in_accel_x_offset": "2"},
    ).create()
    with IioAccelerometer(device.path, 20.0) as sensor:
        (reading,) = sensor.read(threading.Event(), 5)
    # x: (10 + 2) * 0.5; y: shared scale, no offset; z: its own scale wins over the shared one.
    assert reading.xyz == (6.0, -10.0, 7.5)
    assert reading.label is None
    assert abs(reading.t_ns - time.time_ns()) < 10**9
    assert sensor.counters()["samples_read"] == 1


def test_iio_follows_changing_values_at_the_sampling_rate(tmp_path: Path) -> None:
    device = FakeIio(tmp_path, raw=(2, 4, 6)).create()
    stop = threading.Event()
    sensor = IioAccelerometer(device.path, 200.0)
    start = time.monotonic()
    first = sensor.read(stop, 1)
    device.set_raw("x", 40)
    second = sensor.read(stop, 1)
    device.set_raw("y", -8)
    third = sensor.read(stop, 1)
    elapsed = time.monotonic() - start
    assert [r.xyz for r in first + second + third] == [(1, 2, 3), (20, 2, 3), (20, -4, 3)]
    stamps = [r.t_ns for r in first + second + third]
    assert stamps == sorted(stamps)
    assert elapsed >= 2 * (1 / 200.0) * 0.9  # two periods between three polls


def test_iio_sets_the_sampling_frequency_and_never_fails_when_it_cannot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writable = FakeIio(
        tmp_path,
        number=0,
        attributes={
            "in_accel_scale": "1",
            "in_accel_sampling_frequency": "100",
            "in_accel_sampling_frequency_available": "10 25 50 100",
        },
    ).create()
    caplog.set_level(logging.INFO, logger="device_agent.sensors")
    IioAccelerometer(writable.path, 25.0)
    assert (writable.path / "in_accel_sampling_frequency").read_text().strip() == "25"
    assert "reports 25 Hz (requested 25 Hz; available: 10 25 50 100)" in caplog.text

    # A directory in its place makes the write fail (EISDIR), as a read-only attribute would.
    stubborn = FakeIio(tmp_path, number=1, attributes={"in_accel_scale": "1"}).create()
    (stubborn.path / "sampling_frequency").mkdir()
    sensor = IioAccelerometer(stubborn.path, 25.0)
    assert "could not set" in caplog.text
    assert sensor.read(threading.Event(), 1)[0].xyz == (0.0, 0.0, 0.0)


def test_iio_survives_a_file_that_disappears_and_comes_back(
    tmp_path: Path, log_event: Callable[[str], threading.Event]
) -> None:
    device = FakeIio(tmp_path, raw=(2, 2, 2)).create()
    sensor = IioAccelerometer(device.path, 100.0, max_backoff_s=0.02)
    stop = threading.Event()
    assert sensor.read(stop, 1)[0].xyz == (1, 1, 1)

    (device.path / "in_accel_y_raw").unlink()  # hot-unplug
    assert sensor.poll_once() is None
    assert sensor.counters()["read_errors"] == 1

    failed_again = log_event("failed again")
    thread, results = read_in_thread(sensor, stop)
    assert failed_again.wait(WAIT_S), "read() did not retry"
    assert thread.is_alive()  # still waiting for a good sample, not crashed
    recovered = log_event("recovered")
    device.set_raw("y", 6)
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert results.get_nowait()[0].xyz == (1, 3, 1)
    assert recovered.is_set()
    assert sensor.counters()["read_errors"] >= 2


def test_iio_counts_garbage_and_io_errors_without_crashing(tmp_path: Path) -> None:
    device = FakeIio(tmp_path, raw=(2, 2, 2)).create()
    sensor = IioAccelerometer(device.path, 20.0)
    device.set_raw("x", "n/a")
    assert sensor.poll_once() is None
    (device.path / "in_accel_z_raw").unlink()
    (device.path / "in_accel_z_raw").mkdir()  # reading it fails with EISDIR, an OSError like EIO
    device.set_raw("x", 2)
    assert sensor.poll_once() is None
    (device.path / "in_accel_scale").write_text("garbage\n")
    assert sensor.poll_once() is None
    assert sensor.counters()["read_errors"] == 3
    (device.path / "in_accel_z_raw").rmdir()
    device.set_raw("z", 2)
    (device.path / "in_accel_scale").write_text("2\n")  # re-read after the failures
    reading = sensor.poll_once()
    assert reading is not None
    assert reading.xyz == (4, 4, 4)


def test_iio_drops_values_a_batch_would_reject(tmp_path: Path) -> None:
    device = FakeIio(tmp_path, raw=(4000, 0, 0)).create()  # 2000 m/s^2 with scale 0.5
    sensor = IioAccelerometer(device.path, 20.0)
    assert sensor.poll_once() is None
    assert sensor.counters()["out_of_range"] == 1
    assert sensor.counters()["read_errors"] == 0


def test_iio_read_returns_promptly_on_stop_while_the_device_is_gone(tmp_path: Path) -> None:
    device = FakeIio(tmp_path).create()
    sensor = IioAccelerometer(device.path, 20.0, max_backoff_s=60.0)
    for axis in "xyz":
        (device.path / f"in_accel_{axis}_raw").unlink()
    stop = threading.Event()
    thread, results = read_in_thread(sensor, stop)
    stop.set()
    thread.join(1.0)
    assert not thread.is_alive()
    assert results.get_nowait() == []


def test_iio_discovery_skips_other_sensors_and_orders_devices_numerically(tmp_path: Path) -> None:
    pressure = tmp_path / "iio:device0"
    pressure.mkdir()
    (pressure / "name").write_text("bmp280\n")
    (pressure / "in_pressure_raw").write_text("1013\n")
    (tmp_path / "trigger0").mkdir()
    FakeIio(tmp_path, number=10, name="second").create()
    first = FakeIio(tmp_path, number=2, name="first").create()
    assert find_iio_accelerometer(tmp_path) == first.path
    sensor = open_sensor(SensorSettings(kind="iio", iio_sysfs_root=tmp_path))
    assert isinstance(sensor, IioAccelerometer)
    assert sensor.device_dir == first.path


def test_iio_not_found_says_what_was_searched(tmp_path: Path) -> None:
    pressure = tmp_path / "iio:device0"
    pressure.mkdir()
    (pressure / "name").write_text("bmp280\n")
    with pytest.raises(ConfigError, match=r"searched: iio:device0 \(name 'bmp280'\): no in_accel"):
        find_iio_accelerometer(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        open_sensor(SensorSettings(kind="iio", iio_sysfs_root=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not an accelerometer: no in_accel_x_raw"):
        IioAccelerometer(pressure, 20.0)


# --- WISDM replay ----------------------------------------------------------------------------

MS = 1_000_000
WISDM_TEXT = (
    "1,Walking,1000000000,1.0,2.0,3.0;\n"
    "1,Walking,1050000000,1.1,2.1,3.1;\n"
    "2,Jogging,1060000000,9.0,9.0,9.0;\n"  # another user, interleaved
    "1,Walking,1100000000,1.2,2.2,3.2;\n"
    "1,Sitting,1200000000,0.5,0.6,9.7;\n"  # 100 ms: a dropped sample, kept as is
    "1,Sitting,1200000000,0.6,0.6,9.7;\n"  # same timestamp: one period (50 ms)
    "1,Sitting,900000000,0.7,0.6,9.7;\n"  # backwards: a session break, a 1 s gap
    "1,Sitting,9900000000,0.8,0.6,9.7;\n"  # a 9 s gap: a session break, a 1 s gap
    "1,Sitting,9950000000,0.9,0.6,9.7;\n"
)
USER1_X = [1.0, 1.1, 1.2, 0.5, 0.6, 0.7, 0.8, 0.9]
USER1_STEPS_MS = [50, 50, 100, 50, 1000, 1000, 50]


@pytest.fixture
def wisdm_file(tmp_path: Path) -> Path:
    path = tmp_path / "wisdm.txt"
    path.write_text(WISDM_TEXT)
    return path


def test_replay_keeps_file_order_spacing_and_true_labels(wisdm_file: Path) -> None:
    replay = WisdmReplay(wisdm_file, user=1, speed=0)
    before = time.time_ns()
    readings = replay.read(threading.Event(), 100)
    assert [r.xyz[0] for r in readings] == pytest.approx(USER1_X)
    assert [r.label for r in readings] == ["Walking"] * 3 + ["Sitting"] * 5
    assert np.diff([r.t_ns for r in readings]).tolist() == [s * MS for s in USER1_STEPS_MS]
    assert abs(readings[0].t_ns - before) < 10**9  # re-based to now
    assert replay.exhausted
    assert replay.read(threading.Event(), 100) == []
    assert replay.counters() == {"samples_read": 8, "loops": 0, "timestamp_fixes": 3}


def test_replay_paces_at_real_time_times_speed(tmp_path: Path) -> None:
    path = tmp_path / "wisdm.txt"
    path.write_text("".join(f"3,Walking,{10**9 + i * 50 * MS},1,2,3;\n" for i in range(11)))
    replay = WisdmReplay(path, user=3, speed=10.0)  # 5 ms between samples
    start = time.monotonic()
    readings = read_n(replay, 11, max_samples=3)
    elapsed = time.monotonic() - start
    assert elapsed >= 10 * 0.005 * 0.9
    # Stamps describe the recording, not the accelerated arrival.
    assert np.diff([r.t_ns for r in readings]).tolist() == [50 * MS] * 10


def test_replay_read_returns_promptly_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "wisdm.txt"
    path.write_text("4,Standing,1000000000,0,9.8,0;\n4,Standing,1900000000,0,9.8,0;\n")
    replay = WisdmReplay(path, user=4)
    stop = threading.Event()
    assert len(replay.read(stop, 10)) == 1
    thread, results = read_in_thread(replay, stop)  # the next sample is 0.9 s away
    stop.set()
    thread.join(0.5)
    assert not thread.is_alive()
    assert results.get_nowait() == []


def test_replay_loops_with_increasing_stamps(wisdm_file: Path) -> None:
    replay = WisdmReplay(wisdm_file, user=1, speed=math.inf, loop=True)
    readings = read_n(replay, 2 * replay.n_records + 1)
    assert [r.xyz[0] for r in readings] == pytest.approx(USER1_X * 2 + USER1_X[:1])
    steps = np.diff([r.t_ns for r in readings])
    assert (steps > 0).all()
    assert steps[replay.n_records - 1] == 1000 * MS  # starting over is a break, like a session's
    assert not replay.exhausted
    assert replay.counters()["loops"] == 2
    replay.close()
    assert replay.exhausted
    assert replay.read(threading.Event(), 1) == []


def test_replay_of_one_activity(wisdm_file: Path) -> None:
    replay = WisdmReplay(wisdm_file, user=1, speed=0, activity="SITTING")
    assert {r.label for r in replay.read(threading.Event(), 100)} == {"Sitting"}
    with pytest.raises(ConfigError, match=r"no 'Jogging' records .* Sitting, Walking"):
        WisdmReplay(wisdm_file, user=1, activity="jogging")


def test_replay_of_an_unknown_user_or_file_is_a_clear_error(
    wisdm_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"user 7 has no records in .*; users present: 1, 2"):
        WisdmReplay(wisdm_file, user=7)
    with pytest.raises(DataError, match="no such data file"):
        WisdmReplay(tmp_path / "nope.txt", user=1)
    with pytest.raises(ConfigError, match=r"needs sensor\.replay_file"):
        SensorSettings(kind="replay")


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed_whatever_the_read_sizes() -> None:
    def xyz(seed: int, chunk: int) -> list[tuple[float, float, float]]:
        source = SyntheticAccelerometer(50.0, seed, segment_s=1.0, speed=0)
        return [r.xyz for r in read_n(source, 300, max_samples=chunk)]

    assert xyz(7, 1) == xyz(7, 64)
    assert xyz(7, 10) != xyz(8, 10)


def test_synthetic_static_activities_are_gravity_on_different_axes() -> None:
    activities = ("Sitting", "Standing", "Laying")
    source = SyntheticAccelerometer(20.0, 3, activities, segment_s=5.0, speed=0)
    readings = read_n(source, 300)
    dominant = []
    for k, name in enumerate(activities):
        block = readings[k * 100 : (k + 1) * 100]
        assert {r.label for r in block} == {name}
        xyz = np.array([r.xyz for r in block])
        assert np.linalg.norm(xyz, axis=1).mean() == pytest.approx(9.81, abs=0.15)
        assert xyz.std(axis=0).max() < 0.3
        dominant.append(int(np.abs(xyz.mean(axis=0)).argmax()))
    assert len(set(dominant)) == 3


def test_synthetic_moving_activities_step_at_their_rate() -> None:
    source = SyntheticAccelerometer(20.0, 1, "walking, jogging", segment_s=12.8, speed=0)
    readings = read_n(source, 512)
    freqs = np.fft.rfftfreq(256, d=1 / 20.0)
    spreads = []
    for k, (low, high) in enumerate([(1.7, 2.3), (2.4, 3.2)]):
        y = np.array([r.xyz[1] for r in readings[k * 256 : (k + 1) * 256]])
        peak = freqs[1:][np.abs(np.fft.rfft(y - y.mean()))[1:].argmax()]
        assert low <= peak <= high
        assert abs(y.mean() - 9.3) < 1.0  # gravity is still there
        spreads.append(y.std())
    assert spreads[1] > 1.5 * spreads[0]  # jogging is rougher than walking
    assert [readings[0].label, readings[-1].label] == ["Walking", "Jogging"]


def test_synthetic_labels_switch_every_segment_and_cycle() -> None:
    source = SyntheticAccelerometer(20.0, 0, ["Walking", "Sitting"], segment_s=1.0, speed=0)
    readings = read_n(source, 60)
    assert [r.label for r in readings] == (["Walking"] * 20 + ["Sitting"] * 20) + ["Walking"] * 20
    assert np.diff([r.t_ns for r in readings]).tolist() == [50 * MS] * 59
    assert source.counters() == {"samples_read": 60, "segments": 3}
    assert not source.exhausted


def test_synthetic_is_paced_in_real_time() -> None:
    source = SyntheticAccelerometer(200.0, 0, speed=1.0)
    start = time.monotonic()
    read_n(source, 11)
    assert time.monotonic() - start >= 10 * 0.005 * 0.9


def test_synthetic_rejects_unknown_activities() -> None:
    with pytest.raises(ValueError, match="unknown synthetic activity 'Flying'; known: Walking"):
        SyntheticAccelerometer(20.0, 0, ["walking", "flying"])
    with pytest.raises(ConfigError, match=r"sensor\.synthetic_activities"):
        SensorSettings(synthetic_activities="walking,swimming")


# --- CSV lines on a stream -------------------------------------------------------------------


def drain(source: StdinCsv) -> list[SensorReading]:
    """Everything until the end of the stream."""
    stop = threading.Event()
    out: list[SensorReading] = []
    while not source.exhausted:
        out.extend(source.read(stop, 4))
    return out


def test_stdin_csv_parses_both_forms_and_counts_malformed_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = (
        "# x,y,z from a test\n"
        "1,2,3\n"
        "\n"
        "  4.5 5.5\t6.5   # blanks work too\n"
        "1,2\n"  # line 5: too few fields
        "1,2,abc\n"  # line 6: not a number
        "1,,3\n"  # line 7: empty field
        "1,2,nan\n"  # line 8: not finite
        "1,2,5000\n"  # line 9: beyond what a batch accepts
        "7,8,9"  # line 10: no newline at the end
    )
    source = StdinCsv(io.StringIO(text), 20.0)
    with source:
        readings = drain(source)
    assert [r.xyz for r in readings] == [(1, 2, 3), (4.5, 5.5, 6.5), (7, 8, 9)]
    # No stamps in the input: one period apart, from the arrival of the first line.
    assert np.diff([r.t_ns for r in readings]).tolist() == [50 * MS] * 2
    assert abs(readings[0].t_ns - time.time_ns()) < 10**9
    assert source.counters() == {
        "samples_read": 3,
        "lines_read": 10,
        "malformed_lines": 5,
        "stream_errors": 0,
    }
    assert "line 6 skipped (" in caplog.text
    assert "'abc' is not a number" in caplog.text
    assert source.read(threading.Event(), 1) == []


def test_stdin_csv_keeps_given_stamps_and_rejects_backward_ones() -> None:
    text = "1000,1,2,3\n2000 4 5 6\n1500,0,0,0\n-5,1,1,1\n3000,7,8,9\n"
    with StdinCsv(io.StringIO(text), 20.0) as source:
        readings = drain(source)
    assert [(r.t_ns, r.xyz) for r in readings] == [
        (1000, (1, 2, 3)),
        (2000, (4, 5, 6)),
        (3000, (7, 8, 9)),
    ]
    assert source.counters()["malformed_lines"] == 2


def test_stdin_csv_skips_overlong_lines_and_undecodable_bytes() -> None:
    text = "1,2,3\n" + "9" * 5000 + "\n4,5,6\n"
    with StdinCsv(io.StringIO(text), 20.0) as source:
        assert [r.xyz for r in drain(source)] == [(1, 2, 3), (4, 5, 6)]
    assert source.counters()["malformed_lines"] == 1

    binary = io.TextIOWrapper(io.BytesIO(b"1,2,3\n\xff\xfe\n"), encoding="utf-8")
    with StdinCsv(binary, 20.0) as source:
        drain(source)
    assert source.counters()["malformed_lines"] == 1


def test_stdin_csv_applies_backpressure_without_losing_lines() -> None:
    text = "".join(f"{i},0,0\n" for i in range(50))
    with StdinCsv(io.StringIO(text), 20.0, queue_size=2) as source:
        assert [r.xyz[0] for r in drain(source)] == list(range(50))


def test_stdin_csv_over_a_pipe_honours_stop_and_ends_at_eof() -> None:
    read_fd, write_fd = os.pipe()
    with (
        open(read_fd, encoding="utf-8") as reader,
        open(write_fd, "w", encoding="utf-8") as writer,
        StdinCsv(reader, 20.0) as source,
    ):
        stop = threading.Event()
        writer.write("1,2,3\nbad line\n4,5,6\n")
        writer.flush()
        got: list[SensorReading] = []
        while len(got) < 2:
            got.extend(source.read(stop, 10))
        assert [r.xyz for r in got] == [(1, 2, 3), (4, 5, 6)]

        thread, results = read_in_thread(source, stop)  # nothing more to read: it blocks
        stop.set()
        thread.join(1.0)
        assert not thread.is_alive(), "read() ignored stop"
        assert results.get_nowait() == []
        assert not source.exhausted

        writer.write("7 8 9\n")
        writer.close()  # EOF
        rest = drain(source)
    assert [r.xyz for r in rest] == [(7, 8, 9)]
    assert source.exhausted
    assert source.counters()["malformed_lines"] == 1


def test_stdin_csv_close_stops_a_blocked_reader() -> None:
    read_fd, write_fd = os.pipe()
    with open(read_fd, encoding="utf-8") as reader, open(write_fd, "w") as writer:
        source = StdinCsv(reader, 20.0, queue_size=1)
        writer.write("1,1,1\n2,2,2\n3,3,3\n")  # more than the queue holds: the reader waits
        writer.flush()
        assert source.read(threading.Event(), 1)[0].xyz == (1, 1, 1)
        source.close()
        assert source.exhausted
        assert source.read(threading.Event(), 1) == []


lines = st.lists(
    st.one_of(
        st.text(max_size=60).map(lambda s: s.replace("\n", " ")),
        st.tuples(*[st.floats(-2000, 2000) | st.floats()] * 3).map(lambda v: ",".join(map(str, v))),
        st.lists(st.sampled_from(["1", "-2.5", "#", ",", " ", "\t", "1e3", "x"]), max_size=8).map(
            "".join
        ),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(line=st.text(max_size=80))
def test_the_parser_only_ever_raises_its_own_error(line: str) -> None:
    try:
        sample = parse_csv_line(line)
    except MalformedLineError:
        return
    if sample is not None:
        assert all(math.isfinite(v) and abs(v) <= MAX_ABS_ACCELERATION for v in sample.xyz)
        assert sample.t_ns is None or sample.t_ns >= 0


@settings(max_examples=60, deadline=None)
@given(text_lines=lines)
def test_arbitrary_input_never_crashes_and_every_line_is_accounted_for(
    text_lines: list[str],
) -> None:
    with StdinCsv(io.StringIO("".join(f"{line}\n" for line in text_lines)), 20.0) as source:
        readings = drain(source)
    counters = source.counters()
    ignored = 0
    for line in text_lines:
        with contextlib.suppress(MalformedLineError):
            ignored += parse_csv_line(line) is None
    assert counters["lines_read"] == len(text_lines)
    assert counters["stream_errors"] == 0
    assert len(readings) + counters["malformed_lines"] + ignored == len(text_lines)


# --- settings and the factory ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentLike:
    sensor: SensorSettings = field(default_factory=SensorSettings)


def test_settings_layer_like_the_agent_will_nest_them(tmp_path: Path, wisdm_file: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[sensor]\nkind = "Replay"\nreplay_file = "{wisdm_file}"\nspeed = 0\n')
    loaded = load_settings(AgentLike, config_file=config, environ={"HAR_SENSOR_REPLAY_USER": "2"})
    assert loaded.sensor.kind == "replay"
    source = open_sensor(loaded.sensor)
    assert isinstance(source, WisdmReplay)
    assert [r.label for r in source.read(threading.Event(), 10)] == ["Jogging"]

    with pytest.raises(ConfigError, match=r"sensor\.kind 'camera' is not one of iio, replay"):
        load_settings(AgentLike, overrides={"sensor.kind": "camera"})
    with pytest.raises(ConfigError, match=r"sensor\.speed must be >= 0"):
        load_settings(AgentLike, environ={"HAR_SENSOR_SPEED": "-1"})


def test_every_kind_opens_to_a_sensor_source(tmp_path: Path, wisdm_file: Path) -> None:
    device = FakeIio(tmp_path / "sys").create()
    specs = [
        SensorSettings(kind="iio", iio_device=device.path),
        SensorSettings(kind="replay", replay_file=wisdm_file, speed=0),
        SensorSettings(kind="synthetic", speed=0, seed=5),
        SensorSettings(kind="stdin"),
    ]
    for spec in specs:
        source = open_sensor(spec, stdin=io.StringIO("1,2,3\n"))
        try:
            assert isinstance(source, SensorSource)
            assert source.sample_rate_hz == 20.0
            assert len(source.read(threading.Event(), 1)) == 1
            assert source.counters()["samples_read"] == 1
        finally:
            source.close()
