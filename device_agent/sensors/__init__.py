"""Accelerometer sources for the device agent: one protocol, four implementations, one factory.

``open_sensor(SensorSettings(...))`` gives a :class:`SensorSource`; the agent calls
``read(stop, max_samples)`` in a loop and publishes the readings in batches.
"""

from device_agent.sensors.base import SensorReading, SensorSource, WallAnchoredClock
from device_agent.sensors.iio import IioAccelerometer, find_iio_accelerometer
from device_agent.sensors.replay import WisdmReplay
from device_agent.sensors.settings import SENSOR_KINDS, SensorSettings, open_sensor
from device_agent.sensors.stdin import CsvSample, MalformedLineError, StdinCsv, parse_csv_line
from device_agent.sensors.synthetic import (
    ACTIVITY_PROFILES,
    ActivityProfile,
    SyntheticAccelerometer,
    parse_activities,
)

__all__ = [
    "ACTIVITY_PROFILES",
    "SENSOR_KINDS",
    "ActivityProfile",
    "CsvSample",
    "IioAccelerometer",
    "MalformedLineError",
    "SensorReading",
    "SensorSettings",
    "SensorSource",
    "StdinCsv",
    "SyntheticAccelerometer",
    "WallAnchoredClock",
    "WisdmReplay",
    "find_iio_accelerometer",
    "open_sensor",
    "parse_activities",
    "parse_csv_line",
]
