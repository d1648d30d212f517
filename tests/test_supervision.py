"""The failure policy's last line: a loop that dies is noticed, named and logged."""

from __future__ import annotations

import logging
import threading

from shared.supervision import Supervisor


def test_a_loop_that_ends_cleanly_is_no_death() -> None:
    supervisor = Supervisor()
    ran = threading.Event()
    supervisor.add("sim-clean", ran.set)
    supervisor.start()
    for thread in supervisor.threads:
        thread.join(10)
    assert ran.is_set()
    assert not supervisor.wait(0)
    assert supervisor.death is None
    assert supervisor.dead_threads() == []


def test_a_loop_that_raises_wakes_the_waiter_with_its_name_and_is_logged(
    logged_exceptions: list[logging.LogRecord],
) -> None:
    supervisor = Supervisor()
    release = threading.Event()

    def dies() -> None:
        raise RuntimeError("bug")

    supervisor.add("sim-healthy", lambda: release.wait(10))
    supervisor.add("sim-dying", dies)
    supervisor.start()
    try:
        assert supervisor.wait(10)
        death = supervisor.death
        assert death is not None
        assert death[0] == "sim-dying"
        assert isinstance(death[1], RuntimeError)
        assert supervisor.dead_threads() == ["sim-dying"]
        assert [record.threadName for record in logged_exceptions] == ["sim-dying"]
        assert logged_exceptions[0].levelno == logging.CRITICAL
    finally:
        release.set()
        for thread in supervisor.threads:
            thread.join(10)
