"""The MQTT adapter: every paho client of this project is made here (``new_paho_client``: MQTT 5,
login, TLS, last will, in-flight window), and ``MqttConnection`` runs one. The simulator
(``simulator.link``, ``simulator.event_loop``) drives many clients made here on one thread of
its own instead of paho's loop per client.

``MqttConnection`` keeps a client connected (reconnecting with capped exponential backoff and
jitter), resubscribes and publishes its birth messages on every connect, and hands every inbound
message to a bounded queue. Paho's network thread only converts and enqueues: decoding, inference,
learning and database writes happen on the caller's workers.

Inbound QoS 1 messages are acknowledged manually, by the worker, once it has handled them
(``InboundMessage.ack``); a message a crashed worker did not acknowledge is redelivered by the
broker. The connection asks for an MQTT 5 Receive Maximum equal to the queue's capacity, but
Mosquitto 2.0 stops honouring it once acknowledgements flow (1,478 messages in flight to one
client were measured), so what a full queue cannot take waits in the ``Intake``'s overflow, and
paho's network thread never waits (it also writes the PUBACKs and PINGREQs that keep the
connection alive). A QoS 1 message is never dropped here. Only QoS 0 messages, whose contract
allows it, are dropped (and counted) when the queue is full.

Every paho callback is guarded: an exception in one is logged and counted
(``transport_callback_errors``), never allowed to end paho's network thread.

Outbound messages are QoS 1 (QoS 2 works too). ``publish`` returns a ``PublishHandle`` that
completes when the broker answers, with the MQTT 5 reason code of its PUBACK: a broker answers a
publish its ACL forbids too (0x87 Not authorized), so "answered" is not "accepted".
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared.codec import CONTENT_TYPE_JSON
from shared.config import BrokerSettings
from shared.counters import Counters
from shared.errors import BrokerError
from shared.supervision import EXIT_THREAD_DIED

log = logging.getLogger(__name__)

# CONNACK reason codes after which retrying cannot help: stop and say so (bad credentials,
# not authorised, banned, bad client id).
_FATAL_CONNACK = frozenset({133, 134, 135, 138, 140})
SESSION_TAKEN_OVER = 142  # DISCONNECT reason 0x8E: another client connected with our client id
_SESSION_EXPIRY_S = 7 * 24 * 3600  # how long the broker keeps a persistent session of ours
_INBOX_WAIT_S = 0.5  # how often the intake thread waiting for inbox room checks for a stop
# Publishes sent but not answered yet, beyond which publish() waits for answers: below paho's
# 65,535 packet ids (a reused id is refused as "Message queue full"), and a bound on memory.
MAX_UNANSWERED = 20_000
_ROOM_WAIT_S = 0.5  # how often a publish waiting for room checks for a stop
_PACKET_ID_TRIES = 100  # packet ids tried for one publish before giving up (ids in use)
# Failed attempts to reach a broker never reached before, after which one hint says what to check.
_HINT_AFTER_FAILED_ATTEMPTS = 3


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that logs and counts its exceptions instead of ending paho's thread."""

    @functools.wraps(callback)
    def guarded(self: MqttConnection, *args: Any) -> None:
        try:
            callback(self, *args)
        except Exception:
            log.exception("MQTT callback %s failed", callback.__name__)
            self.counters.add("transport_callback_errors")

    return guarded


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to publish, with its MQTT 5 content type."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    content_type: str = CONTENT_TYPE_JSON


@dataclass(slots=True)
class InboundMessage:
    """A received message, detached from paho. Call ``ack()`` once it has been handled."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None
    _ack: Callable[[], None] | None = field(default=None, repr=False)
    # MQTT's DUP flag: the broker sent it before and got no acknowledgement (a redelivery).
    redelivered: bool = False

    def digest(self) -> bytes:
        """What the message is, as far as its receiver can tell: its topic and its bytes (a
        redelivery has the same digest)."""
        hashed = hashlib.sha256(self.topic.encode("utf-8", "surrogatepass") + b"\0")
        hashed.update(self.payload)
        return hashed.digest()

    def ack(self) -> None:
        """Acknowledge a QoS 1 message to the broker (no-op for QoS 0 or a second call)."""
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack()


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """The broker's answer to one publish: the MQTT 5 reason code of its PUBACK (QoS 2: PUBCOMP)."""

    code: int
    reason: str  # e.g. "Success", "No matching subscribers", "Not authorized"

    @classmethod
    def of(cls, reason_code: ReasonCode) -> PublishOutcome:
        return cls(reason_code.value, str(reason_code))

    @property
    def accepted(self) -> bool:
        # MQTT 5: every code below 0x80 is a success, 0x10 "No matching subscribers" included.
        return self.code < 0x80

    def describe(self) -> str:
        return f"{self.reason} (0x{self.code:02x})"


class PublishRefusedError(BrokerError):
    """The broker answered a publish with a failure reason code: sending it again cannot help."""

    def __init__(self, topic: str, outcome: PublishOutcome) -> None:
        super().__init__(f"the broker refused the publish to {topic}: {outcome.describe()}")
        self.topic = topic
        self.outcome = outcome


class PublishHandle:
    """One publish, until the broker answers it (accepting or refusing it).

    The connection completes it from paho's ``on_publish`` callback, by packet id. Paho keeps a
    message published while disconnected and sends it after reconnecting; its handle completes
    when the broker answers it then.
    """

    __slots__ = ("_answered", "_outcome", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._answered = threading.Event()
        self._outcome: PublishOutcome | None = None

    @property
    def done(self) -> bool:
        """True once the broker answered, whatever it said."""
        return self._answered.is_set()

    @property
    def refused(self) -> bool:
        """True once the broker answered with a failure reason code (retrying cannot help)."""
        outcome = self._outcome
        return outcome is not None and not outcome.accepted

    def outcome(self) -> PublishOutcome | None:
        """The broker's answer, or None while it has not come."""
        return self._outcome

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the broker's answer; True once it came.

        An answer may be a refusal: look at ``outcome()``, or use ``wait_accepted``.
        """
        return self._answered.wait(timeout)

    def wait_accepted(self, timeout: float) -> PublishOutcome:
        """The broker's acceptance.

        Raises PublishRefusedError if the broker refused the message, BrokerError if it did not
        answer within ``timeout`` seconds.
        """
        if not self.wait(timeout):
            raise BrokerError(f"the broker did not acknowledge {self.topic} within {timeout:g} s")
        outcome = self._outcome
        assert outcome is not None  # set before _answered
        if not outcome.accepted:
            raise PublishRefusedError(self.topic, outcome)
        return outcome

    def _complete(self, outcome: PublishOutcome) -> None:
        self._outcome = outcome
        self._answered.set()


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before reconnect ``attempt`` (1-based): capped exponential, full jitter.

    Full jitter spreads a fleet that lost the broker at the same instant over the whole interval,
    so the broker is not hit by every device at once when it comes back.
    """
    # The exponent stops growing long before max_s binds; uncapped, 2.0 ** 1025 overflows after
    # some 1025 failed attempts (8.5 hours without a broker at a 30 s ceiling).
    ceiling = min(max_s, min_s * 2.0 ** min(max(0, attempt - 1), 64))
    return min_s + rng.random() * max(0.0, ceiling - min_s)


def content_properties(content_type: str, packet_type: int = PacketTypes.PUBLISH) -> Properties:
    """MQTT 5 properties naming the payload's content type (for a publish or a last will)."""
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    props.ContentType = content_type
    if content_type == CONTENT_TYPE_JSON:
        props.PayloadFormatIndicator = 1  # UTF-8 text: brokers and tools may check it
    return props


class _PackedOnce(Properties):
    """MQTT 5 properties whose wire form is computed once.

    paho packs the Properties of every publish again, at about 0.1 ms each: at a thousand
    devices (``har sim``) that alone took a fifth of the simulator's thread.
    """

    def __init__(self, packet_type: int, packed: bytes) -> None:
        super().__init__(packet_type)  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_packed", packed)  # Properties refuses unknown attributes

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed


class PropertiesCache:
    """The few kinds of publish properties a client needs, each built and packed once.

    Safe from several threads: two threads may build the same kind at once, and one wins.
    """

    def __init__(self) -> None:
        self._by_kind: dict[tuple[str, int], Properties] = {}

    def get(self, content_type: str, packet_type: int = PacketTypes.PUBLISH) -> Properties:
        key = (content_type, packet_type)
        if key not in self._by_kind:
            packed = content_properties(content_type, packet_type).pack()  # type: ignore[no-untyped-call]
            self._by_kind[key] = _PackedOnce(packet_type, packed)
        return self._by_kind[key]


def apply_tls(client: paho.Client, settings: BrokerSettings) -> None:
    """Turn on TLS for ``client`` as ``settings`` say (the system's CAs without a ca_file)."""
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
        )


def new_paho_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    username: str,
    password: str,
    will: Outbound | None,
    properties: PropertiesCache,
    max_inflight: int,
    manual_ack: bool = False,
) -> paho.Client:
    """A paho client set up as every connection of this project is: MQTT 5, the login, TLS when
    ``settings`` ask for it, the last will, the in-flight window. Not connected yet."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        manual_ack=manual_ack,
    )
    client.max_inflight_messages_set(max_inflight)  # before connect(), or ignored
    if username:
        client.username_pw_set(username, password or None)
    apply_tls(client, settings)
    if will is not None:
        client.will_set(
            will.topic,
            will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=properties.get(will.content_type, PacketTypes.WILLMESSAGE),
        )
    return client


class TakingTurns:
    """Notices a connection that keeps being closed soon after it was made, the sign of another
    client on the same login where the broker takes the client id from the login (Mosquitto's
    ``use_username_as_clientid`` closes the older connection without saying why).

    ``dropped`` is True once ``times`` connections in ``within_s`` each lasted under
    ``short_s``; then not again for ``within_s``. Called on paho's network thread only."""

    def __init__(
        self,
        *,
        short_s: float = 10.0,
        within_s: float = 60.0,
        times: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._short_s, self._within_s, self._times = short_s, within_s, times
        self._clock = clock
        self._since: float | None = None
        self._short: list[float] = []
        self._said_at: float | None = None

    def connected(self) -> None:
        self._since = self._clock()

    def dropped(self) -> bool:
        now = self._clock()
        since, self._since = self._since, None
        if since is None or now - since >= self._short_s:
            return False
        self._short = [t for t in self._short if now - t < self._within_s] + [now]
        if len(self._short) < self._times:
            return False
        if self._said_at is not None and now - self._said_at < self._within_s:
            return False
        self._said_at = now
        return True


class Intake:
    """Hands received QoS 1 messages to the application's inbox without ever blocking paho's
    network thread, which also writes PUBACKs and PINGREQs: a full inbox must slow the
    application down, not end the connection (Mosquitto 2.0.11 overruns Receive Maximum once
    acknowledgements flow, so the inbox can fill).

    ``put`` (paho's thread) queues into the inbox at once, or, while it is full or older
    messages wait, into an unbounded overflow in arrival order; the intake thread moves the
    overflow into the inbox as room frees. Nothing is acknowledged before the application takes
    it, so what waits here at a stop is delivered again by the broker."""

    def __init__(self, inbox: queue.Queue[InboundMessage], counters: Counters, name: str) -> None:
        self._inbox = inbox
        self._counters = counters
        self._overflow: collections.deque[InboundMessage] = collections.deque()
        self._lock = threading.Lock()
        self._waiting = threading.Event()  # set while the overflow holds messages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._waiting.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)

    def put(self, inbound: InboundMessage) -> None:
        with self._lock:
            if not self._overflow:
                with contextlib.suppress(queue.Full):
                    self._inbox.put_nowait(inbound)
                    return
            self._overflow.append(inbound)
            depth = len(self._overflow)
            self._waiting.set()
        self._counters.add("inbox_overflow")
        self._counters.raise_to("inbox_overflow_max", depth)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._waiting.wait(_INBOX_WAIT_S)
                self._drain()
        except BaseException:
            # Received messages would pile up unseen: a process that looks alive and reads
            # nothing. Stop it loudly, so that it is restarted (the broker redelivers).
            log.critical("MQTT intake thread died: the process exits", exc_info=True)
            os._exit(EXIT_THREAD_DIED)

    def _drain(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._overflow:
                    self._waiting.clear()
                    return
                inbound = self._overflow[0]
            try:
                self._inbox.put(inbound, timeout=_INBOX_WAIT_S)
            except queue.Full:
                continue
            with self._lock:
                self._overflow.popleft()


class MqttConnection:
    """A long-lived MQTT 5 connection for one role (device agent, trainer, tool)."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]] = (),
        inbox: queue.Queue[InboundMessage] | None = None,
        will: Outbound | None = None,
        birth: Callable[[], Sequence[Outbound]] | None = None,
        persistent_session: bool = True,
        session_expiry_s: int = 0,  # of a persistent session; 0: _SESSION_EXPIRY_S
        on_connection_change: Callable[[bool], None] | None = None,
        counters: Counters | None = None,
        max_unanswered: int = MAX_UNANSWERED,
    ) -> None:
        if subscriptions and inbox is None:
            raise ValueError("subscriptions need an inbox queue")
        self._settings = settings
        self._client_id = client_id
        self._subscriptions = dict(subscriptions)
        self._subscriptions_lock = threading.Lock()
        self._inbox = inbox
        self._will = will
        self._properties = PropertiesCache()
        self._birth = birth
        self._persistent_session = persistent_session
        self._session_expiry_s = session_expiry_s or _SESSION_EXPIRY_S
        self._on_connection_change = on_connection_change
        self._rng = random.Random()
        # inbox_overflow: messages that waited for inbox room (inbox_overflow_max: most at
        # once); inbox_dropped_qos0: QoS 0 dropped; publish_waits: publishes that waited for room.
        self.counters = counters if counters is not None else Counters()
        self._intake = (
            Intake(inbox, self.counters, f"mqtt-intake-{client_id}") if inbox is not None else None
        )
        self._network_thread: int | None = None  # paho's, from the first connect on
        self._max_unanswered = max_unanswered

        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._fatal: str | None = None
        self._generation = 0
        self.connect_count = 0

        self._stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._attempt = 0
        self._taking_turns = TakingTurns()  # another client on this login?

        # Handles of sent publishes by packet id until on_publish brings the broker's answer, and
        # the answers that came before publish() could file their handle (paho's network thread
        # can be that quick).
        self._answers_lock = threading.Lock()
        self._room = threading.Condition(self._answers_lock)  # an answer came: room to publish
        self._awaiting_answer: dict[int, PublishHandle] = {}
        self._early_answers: dict[int, PublishOutcome] = {}

        self._client = self._make_client()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Connect in the background; paho's thread retries until it gets through."""
        settings = self._settings
        if self._intake is not None:
            self._intake.start()
        self._schedule_retry()
        self._client.connect_async(
            settings.host,
            settings.port,
            keepalive=settings.keepalive_s,
            clean_start=not self._persistent_session,
            properties=self._connect_properties(),
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_connected_or_raise(self, timeout: float) -> None:
        """Wait for the first connection; BrokerError, saying why, if it does not come."""
        settings = self._settings
        deadline = time.monotonic() + timeout
        while not self.wait_connected(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.fatal_error is not None:
                raise BrokerError(
                    f"the broker at {settings.host}:{settings.port} refused the login: "
                    f"{self.fatal_error}"
                )
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"cannot reach the broker at {settings.host}:{settings.port} "
                    f"within {timeout:g} s"
                )

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged this connection's subscriptions."""
        return self._subscribed.wait(timeout)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait until the connection gave up for good (see ``fatal_error``) or was stopped."""
        return self._stopped.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def fatal_error(self) -> str | None:
        """Set when the broker refused us for a reason retrying cannot fix."""
        return self._fatal

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish our last will) and stop retrying.

        Handles of publishes the broker has not answered yet never complete.
        """
        self._stop_requested.set()  # so that our own disconnect is not reported as a problem
        with self._room:
            self._room.notify_all()  # a publish waiting for room gives up
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._subscribed.clear()
        self._stopped.set()
        # paho's loop_stop() leaves its wake-up socket pair open until garbage collection;
        # reinitialise() is its public way to close every socket. This client is not used again.
        self._client.reinitialise()
        if self._intake is not None:
            self._intake.stop()
        with self._answers_lock:
            self._awaiting_answer.clear()
            self._early_answers.clear()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and on every later reconnect."""
        if self._inbox is None:
            raise ValueError("subscriptions need an inbox queue")
        with self._subscriptions_lock:
            self._subscriptions[topic] = qos
        if self._connected.is_set():
            self._client.subscribe(topic, options=SubscribeOptions(qos=qos))

    def unsubscribe(self, topic: str) -> None:
        with self._subscriptions_lock:
            known = self._subscriptions.pop(topic, None) is not None
        if known and self._connected.is_set():
            self._client.unsubscribe(topic)

    # ---------------------------------------------------------------- publishing
    def publish(self, message: Outbound, *, wait_s: float | None = None) -> PublishHandle:
        """Queue ``message`` for sending; the handle gives the broker's answer when it comes.

        While disconnected, paho keeps the message (its rc is NO_CONN) and sends it after
        reconnecting; the handle completes when the broker answers it then.

        Back-pressure: while ``max_unanswered`` publishes wait for the broker's answer, this
        waits for room (up to ``wait_s`` seconds; None: as long as the connection runs) instead
        of queueing without bound, so a loop that publishes faster than the broker answers slows
        down rather than dies. BrokerError if no room comes (stopped, or ``wait_s`` passed).
        On paho's network thread (birth messages) it never waits: that thread brings the answers.
        """
        if message.qos < 1:
            # The protocol is QoS 1 throughout, and a QoS 0 publish is never answered.
            raise ValueError(f"cannot publish {message.topic} at QoS {message.qos}: use 1 or 2")
        on_network_thread = threading.get_ident() == self._network_thread
        deadline = None if wait_s is None else time.monotonic() + wait_s
        for _ in range(_PACKET_ID_TRIES):
            if not on_network_thread:
                self._wait_for_room(message.topic, deadline)
            info = self._client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=self._properties.get(message.content_type),
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                break
            # The packet id paho chose still belongs to an unanswered older publish (ids wrap at
            # 65,535): the next try takes the next id.
            self.counters.add("publish_id_retries")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"publish to {message.topic} failed: {paho.error_string(info.rc)}")
        handle = PublishHandle(message.topic)
        with self._answers_lock:
            early = self._early_answers.pop(info.mid, None)
            if early is None:
                self._awaiting_answer[info.mid] = handle
        if early is not None:
            handle._complete(early)
        return handle

    @property
    def unanswered(self) -> int:
        """Publishes sent (or kept for the next connection) that the broker has not answered."""
        with self._answers_lock:
            return len(self._awaiting_answer)

    def _wait_for_room(self, topic: str, deadline: float | None) -> None:
        with self._room:
            if len(self._awaiting_answer) < self._max_unanswered:
                return
            self.counters.add("publish_waits")
            while len(self._awaiting_answer) >= self._max_unanswered:
                if self._stop_requested.is_set():
                    raise BrokerError(f"publish to {topic}: the connection stopped")
                wait = _ROOM_WAIT_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise BrokerError(
                            f"publish to {topic}: {self._max_unanswered} publishes still wait "
                            "for the broker's answer"
                        )
                self._room.wait(wait)

    # ---------------------------------------------------------------- paho plumbing
    def _make_client(self) -> paho.Client:
        settings = self._settings
        client = new_paho_client(
            settings,
            self._client_id,
            username=settings.username,
            password=settings.resolved_password() if settings.username else "",
            will=self._will,
            properties=self._properties,
            max_inflight=settings.max_inflight,
            manual_ack=True,
        )
        client.max_queued_messages_set(0)
        # Our callbacks guard themselves (_guarded); this covers paho's own internals as well.
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._persistent_session:
            props.SessionExpiryInterval = self._session_expiry_s
        if self._inbox is not None and self._inbox.maxsize > 0:
            # Flow control: never more unacknowledged QoS 1 messages in flight than we can queue.
            props.ReceiveMaximum = min(self._inbox.maxsize, 65535)
        return props

    def _schedule_retry(self) -> None:
        """Set paho's next reconnect delay: our capped exponential backoff, with full jitter."""
        self._attempt += 1
        settings = self._settings
        delay = backoff_delay(
            self._attempt, settings.reconnect_min_s, settings.reconnect_max_s, self._rng
        )
        # min == max pins paho's own doubling to exactly the delay we chose.
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    @_guarded
    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        log.warning(
            "cannot reach broker %s:%d (attempt %d)",
            self._settings.host,
            self._settings.port,
            self._attempt,
        )
        if self.connect_count == 0 and self._attempt == _HINT_AFTER_FAILED_ATTEMPTS:
            log.warning(
                "is a broker running at %s:%d? Start one there, or set broker.host and "
                "broker.port to yours; retrying meanwhile",
                self._settings.host,
                self._settings.port,
            )
        self._schedule_retry()

    @_guarded
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if reason_code.value in _FATAL_CONNACK:
                self._fatal = str(reason_code)
                log.error("broker refused %s for good: %s", self._client_id, reason_code)
                client.disconnect()  # ends paho's retry loop
                self._stopped.set()
            else:
                log.warning("broker refused connection: %s", reason_code)
                self._schedule_retry()
            return
        self._network_thread = threading.get_ident()  # publish() must not wait on this thread
        self._generation += 1
        self._attempt = 0
        self.connect_count += 1
        self.counters.add("broker_connects")  # in the status: 1 plus every reconnect
        self._taking_turns.connected()
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self._settings.host,
            self._settings.port,
            self._client_id,
            flags.session_present,
        )
        with self._subscriptions_lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            client.subscribe([(t, SubscribeOptions(qos=qos)) for t, qos in subscriptions])
        if self._birth is not None:
            for message in self._birth():
                self.publish(message)
        self._connected.set()
        if self._on_connection_change is not None:
            self._on_connection_change(True)

    @_guarded
    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was_connected:
            if self._stop_requested.is_set():
                log.info("disconnected from broker as asked: %s", reason_code)
            elif self._taking_turns.dropped() or reason_code == SESSION_TAKEN_OVER:
                log.error(
                    "disconnected from broker (%s), again soon after connecting: another client "
                    "logged in as %r takes this connection's place, and this one takes it back "
                    "(the broker uses the login as the client id): give each a login of its "
                    "own (deploy/mosquitto/logins, deploy/add-login.sh)",
                    reason_code,
                    self._settings.username,
                )
                self._schedule_retry()
            else:
                log.warning("disconnected from broker: %s", reason_code)
                self._schedule_retry()
            if self._on_connection_change is not None:
                self._on_connection_change(False)

    @_guarded
    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("broker refused subscriptions of %s: %s", self._client_id, refused)
        self._subscribed.set()

    @_guarded
    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # paho calls this once per QoS >= 1 message, when the broker answered it: after the
        # reconnect, too, for a message published while disconnected.
        outcome = PublishOutcome.of(reason_code)
        with self._room:
            handle = self._awaiting_answer.pop(mid, None)
            if handle is None:
                self._early_answers[mid] = outcome
            self._room.notify()
        if handle is not None:
            handle._complete(outcome)

    @_guarded
    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # Runs on paho's network thread: convert, enqueue, return. Nothing slow here.
        assert self._inbox is not None
        props = getattr(message, "properties", None)
        content_type = getattr(props, "ContentType", None) if props is not None else None
        ack = None
        if message.qos > 0:
            ack = self._make_ack(message.mid, message.qos, self._generation)
        inbound = InboundMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            content_type=content_type,
            _ack=ack,
            redelivered=bool(getattr(message, "dup", False)),
        )
        if message.qos == 0:
            try:
                self._inbox.put_nowait(inbound)
            except queue.Full:
                # Dropping a QoS 0 message is its contract; not knowing about it is not.
                self.counters.add("inbox_dropped_qos0")
                log.warning("inbox full, dropped a QoS 0 message on %s", message.topic)
            return
        assert self._intake is not None
        self._intake.put(inbound)  # never waits: this thread also keeps the connection alive

    def _make_ack(self, mid: int, qos: int, generation: int) -> Callable[[], None]:
        def ack() -> None:
            # A packet id from an earlier connection means nothing now: the broker will redeliver
            # that message on the new connection, and receivers deduplicate it.
            if generation == self._generation and self._connected.is_set():
                self._client.ack(mid, qos)

        return ack


@contextmanager
def short_connection(
    settings: BrokerSettings, client_id: str, timeout: float = 10.0
) -> Iterator[MqttConnection]:
    """A connection for one command-line job, without a persistent session: connected (or
    ``BrokerError`` saying why not), and stopped on the way out."""
    connection = MqttConnection(settings, client_id=client_id, persistent_session=False)
    connection.start()
    try:
        connection.wait_connected_or_raise(timeout)
        yield connection
    finally:
        connection.stop()
