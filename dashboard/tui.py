"""The curses loop of ``har watch``: draw ``render()``'s lines, turn keys into actions. Kept thin.

While curses owns the terminal, log records would scribble over the screen: they are held back
and the latest warning is shown on the screen instead.
"""

from __future__ import annotations

import curses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dashboard.client import FleetClient
from dashboard.controller import Dashboard, action_for_key
from dashboard.fleet_view import FleetView
from dashboard.render import Frame, render

TICK_MS = 200  # how often the screen is redrawn when no key is pressed


class _LastWarning(logging.Handler):
    """Keeps the latest warning (or worse) for the screen instead of writing it to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text = f"{record.levelname.lower()}: {record.getMessage()}"


@contextmanager
def _logs_held_back() -> Iterator[_LastWarning]:
    root = logging.getLogger()
    saved = root.handlers[:]
    held = _LastWarning()
    root.handlers = [held]
    try:
        yield held
    finally:
        root.handlers = saved


def run_tui(client: FleetClient, view: FleetView, ack_timeout_s: float) -> int:
    """Run until the user presses q. The client must be started."""
    dashboard = Dashboard(view, client, ack_timeout_s)
    with _logs_held_back() as last_warning:
        curses.wrapper(_loop, client, view, dashboard, last_warning)
    return 0


def _loop(
    screen: curses.window,
    client: FleetClient,
    view: FleetView,
    dashboard: Dashboard,
    last_warning: _LastWarning,
) -> None:
    curses.curs_set(0)
    screen.timeout(TICK_MS)
    settings = client.settings
    while True:
        now = time.time()
        client.pump(view)
        dashboard.poll(now)
        state = "connected to" if client.connected else "RECONNECTING to"
        status = dashboard.status
        if last_warning.text:
            status += f"  |  {last_warning.text}"
        frame = Frame(
            topic_root=client.topics.root,
            connection=f"{state} {settings.host}:{settings.port}",
            selected=dashboard.selected_device(),
            status=status,
        )
        height, width = screen.getmaxyx()
        screen.erase()
        # The last column of the last line cannot be written in curses: leave it free.
        for y, line in enumerate(render(view, frame, width=width - 1, height=height, now=now)):
            attribute = curses.A_REVERSE if line.startswith(">") else curses.A_NORMAL
            screen.addstr(y, 0, line, attribute)
        screen.refresh()
        action = action_for_key(screen.getch())
        if action is not None and not dashboard.handle(action, time.time()):
            return
