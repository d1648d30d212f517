"""One thread driving many paho clients: sockets in a selector, timers in a heap.

paho's own loops take a thread per client, and asyncio adds a task and a future per publish;
for a thousand simulated devices in one process both cost more than the devices do. paho
supports an external event loop (``on_socket_open`` and friends, ``loop_read``/``loop_write``/
``loop_misc``); this is that loop, and nothing else. Other threads (the model runner) hand work
back through ``call_soon_threadsafe``, which wakes the selector through a socket pair.

Every callback, timer and client's socket event is one job: a job that raises is logged with its
traceback, counted (``failures``) and skipped, and the loop goes on with the next. What fails
outside a job (the selector itself) ends ``run`` with the exception: the loop died.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import queue
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0  # paho's keepalive and timeout checks


class Timer:
    """A scheduled call; ``cancel()`` keeps it from running."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: set[paho.Client] = set()
        self._to_write: set[paho.Client] = set()  # queued packets, not yet tried
        self._watching_write: set[paho.Client] = set()  # the socket was full: wait for room
        self.failures = 0  # jobs that raised (each logged with its traceback)

    def time(self) -> float:
        return self._clock()

    # ------------------------------------------------------------------ scheduling
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self._clock() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop's thread; callable from any thread."""
        self._calls.put(callback)
        self.wake()

    def wake(self) -> None:
        # A full pipe means the loop is woken already.
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ paho clients
    def attach(self, client: paho.Client) -> None:
        """Drive ``client`` from this loop (call before ``client.connect``)."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._clients.add(client)

    def detach(self, client: paho.Client) -> None:
        self._clients.discard(client)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._to_write.discard(client)
        self._watching_write.discard(client)
        # Never registered when the connect itself failed.
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Not written from inside paho's call: flushed once per round, and the selector is asked
        # to watch for writability only when the socket could not take everything at once.
        self._to_write.add(client)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._to_write.discard(client)
        if client in self._watching_write:
            self._watching_write.discard(client)
            with contextlib.suppress(KeyError, ValueError):  # closed meanwhile
                self._selector.modify(sock, selectors.EVENT_READ, client)

    def _flush_writes(self) -> None:
        while self._to_write:
            clients, self._to_write = self._to_write, set()
            for client in clients:
                self._guarded(functools.partial(self._flush, client), "writing")

    def _flush(self, client: paho.Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        client.loop_write()
        if client.want_write() and client not in self._watching_write:
            self._watching_write.add(client)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    # ------------------------------------------------------------------ running
    def run(self, until: Callable[[], bool]) -> None:
        """Dispatch events until ``until()`` is true (checked after every round)."""
        next_misc = self._clock() + MISC_INTERVAL_S
        while not until():
            now = self._clock()
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL_S
                for client in list(self._clients):
                    self._guarded(client.loop_misc, "keepalive")
            self._flush_writes()
            deadline = min(next_misc, self._timers[0][0] if self._timers else next_misc)
            for key, mask in self._selector.select(max(0.0, deadline - self._clock())):
                self._guarded(functools.partial(self._dispatch, key, mask), "socket event")
            self._run_calls()
            self._run_timers()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        client = key.data
        if client is None:  # the wake-up pipe
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            return
        if mask & selectors.EVENT_READ:
            client.loop_read()
            sock = client.socket()
            # TLS may hold decrypted bytes the selector cannot see: read them now.
            while sock is not None and getattr(sock, "pending", lambda: 0)():
                client.loop_read()
                sock = client.socket()
        if mask & selectors.EVENT_WRITE and client.socket() is not None:
            client.loop_write()

    def _run_calls(self) -> None:
        while True:
            try:
                callback = self._calls.get_nowait()
            except queue.Empty:
                return
            self._guarded(callback, "call")

    def _run_timers(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guarded(timer.callback, "timer")

    def _guarded(self, job: Callable[[], object], kind: str) -> None:
        try:
            job()
        except Exception:
            # One device's bug must not stop the fleet: log it, count it, carry on.
            self.failures += 1
            log.exception("%s failed: %r", kind, job)

    def close(self) -> None:
        # Clients still attached after ``run`` ended belong to a loop that died: drop their
        # connections, so that the broker publishes their last wills.
        for client in list(self._clients):
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
