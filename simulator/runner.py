"""Wiring ``har sim``: settings -> recordings, verified releases, fleet; signals -> stop."""

from __future__ import annotations

import logging
import resource
import signal
import threading
from typing import Any

from device_agent.releases import ReleaseStore
from shared.errors import ConfigError
from shared.signing import load_public_key
from simulator.fleet import FleetSimulator
from simulator.recordings import load_recordings
from simulator.settings import SimSettings

log = logging.getLogger(__name__)

# Sockets besides the devices' own: the broker links of the people's app, model files, the
# wake-up pipe, TensorFlow's files.
SPARE_FILE_DESCRIPTORS = 256


def run_fleet(settings: SimSettings, *, duration_s: float | None = None) -> dict[str, Any]:
    """Simulate until SIGINT/SIGTERM (or ``duration_s``); return the fleet's report."""
    if settings.public_key is None:
        raise ConfigError("public_key is required: devices install only models signed by it")
    ensure_file_descriptors(settings.devices + SPARE_FILE_DESCRIPTORS)
    releases = ReleaseStore(settings.state_dir / "models", load_public_key(settings.public_key))
    recordings = load_recordings(settings)
    log.info(
        "simulating %d devices (%s..%s) replaying %d people, against %s:%d",
        settings.devices,
        settings.device_ids[0],
        settings.device_ids[-1],
        len(recordings),
        settings.broker.host,
        settings.broker.port,
    )
    fleet = FleetSimulator(settings, recordings, releases)
    previous = {
        signum: signal.signal(signum, lambda *_: fleet.request_stop())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    timer = threading.Timer(duration_s, fleet.request_stop) if duration_s is not None else None
    try:
        if timer is not None:
            timer.start()
        return fleet.run()
    finally:
        if timer is not None:
            timer.cancel()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ensure_file_descriptors(needed: int) -> None:
    """One socket per device: raise the soft limit to what the fleet needs, or say why not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"{needed} open files needed, the hard limit is {hard}: raise it (ulimit -Hn, "
            "LimitNOFILE= in a systemd unit, ulimits in compose) or simulate fewer devices"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
