"""
Webhooks: when a render that was created with a C{callback_url} ends (any
terminal state), the job's JSON is POSTed there, signed, and retried for a
bounded time. Two parts:

  - L{CallbackPolicy}: which URLs a client may give (create time). Only
    hosts the operator allows (C{--callback-allow HOST[:PORT]}; none by
    default), C{http}/C{https}, no userinfo, no fragment, ASCII, at most
    L{MAX_URL_LENGTH} characters. The check is on the name as written:
    what an allowed name resolves to is the operator's DNS (allow an IP
    literal to pin an address). Refused: L{CallbackNotAllowed} (422).
  - L{Webhooks}: the deliveries. Each is one POST at a time, at most
    C{maxConcurrent} at once over every job (the rest wait their turn, at
    most C{maxPending} deliveries in all: past it a new one is dropped and
    logged), each attempt bounded by C{timeout}; retried with capped
    exponential backoff and full jitter until C{retryFor} seconds after
    the first attempt. A 2xx ends it; so does a 4xx other than 408 and 429
    (the receiver refuses it: sending it again will not change that);
    anything else (5xx, 408, 429, a connection error, a timeout, a
    redirect, which is never followed) is retried. Giving up is logged
    with the job id. On L{Webhooks.stop} no retry starts: waiting ones are
    cancelled (logged), attempts in flight end within their timeout.

The signature (L{sign}), in the header C{Twistedsse-Signature:
t=UNIX,v1=HEX}: HEX is HMAC-SHA256, keyed with the C{--callback-secret-file}
secret, of C{t + "." + body} (the decimal timestamp, a dot, the raw body
bytes). Each attempt is signed anew, with its own timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import _json
from ._errors import CallbackNotAllowed, InvalidCallback
from ._job import JobSnapshot

_log = Logger()

#: The longest C{callback_url} a client may give.
MAX_URL_LENGTH = 2048

#: The header that carries the signature.
SIGNATURE_HEADER = b"Twistedsse-Signature"

_DEFAULT_PORTS = {"http": 80, "https": 443}

#: Seconds one attempt may take (connect, send, the answer's head and body).
ATTEMPT_TIMEOUT = 10.0
#: Seconds after the first attempt when a delivery that has not
#: succeeded is given up.
RETRY_FOR = 900.0
#: The first retry's backoff ceiling, and the ceiling's ceiling.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
#: Attempts in flight at once, over every job.
MAX_CONCURRENT = 8
#: Deliveries not yet ended (in flight, waiting for a slot, or waiting to
#: retry); past it a new one is dropped and logged.
MAX_PENDING = 1000


def _host(host: str) -> str:
    """
    A host as compared: lower case, without one trailing dot; an IP
    literal in its canonical form (C{0:0::1} is C{::1}).

    @raise ValueError: an empty host.
    """
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError("no host")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def allowEntry(entry: str) -> tuple[str, int | None]:
    """
    An operator's C{--callback-allow} value, C{HOST} (any port) or
    C{HOST:PORT} (that port only); an IPv6 address in brackets
    (C{[::1]}, C{[::1]:8080}).

    @raise ValueError: not a host name or address, or a bad port.
    """
    text = entry.strip()
    if not text or any(c in text for c in "/@?#\\ \t") or not text.isascii():
        raise ValueError(f"expected HOST or HOST:PORT, got {entry!r}")
    parts = urlsplit("//" + text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {entry!r}") from None
    if parts.hostname is None or (":" in parts.hostname and not text.startswith("[")):
        raise ValueError(f"expected HOST or HOST:PORT, got {entry!r}")
    return _host(parts.hostname), port


@attrs.frozen
class CallbackPolicy:
    """
    The callback URLs clients may give: those whose host (and port, where
    the entry names one) the operator allows.

    @ivar allowed: C{(host, port)} pairs as L{allowEntry} makes them
        (port C{None}: any).
    """

    allowed: frozenset[tuple[str, int | None]] = frozenset()

    @classmethod
    def of(cls, entries: Iterable[str]) -> CallbackPolicy:
        return cls(frozenset(allowEntry(entry) for entry in entries))

    def check(self, url: object) -> str:
        """
        C{url} if a client may have its job's end sent there.

        @raise InvalidCallback: not a string, too long, not an absolute
            http(s) URL, or one with userinfo, a fragment, or characters
            outside printable ASCII.
        @raise CallbackNotAllowed: its host (and port) is not allowed.
        """
        if not isinstance(url, str):
            raise InvalidCallback(f"callback_url must be a string, got {type(url).__name__}")
        if len(url) > MAX_URL_LENGTH:
            raise InvalidCallback(f"callback_url is over {MAX_URL_LENGTH} characters")
        # Printable ASCII only: no spaces, controls, backslashes (which
        # some parsers read as slashes), or non-ASCII (send it
        # percent-encoded, the host in punycode).
        if not url.isascii() or any(not c.isprintable() or c in " \\" for c in url):
            raise InvalidCallback("callback_url must be printable ASCII, without spaces or backslashes")
        try:
            parts = urlsplit(url)
        except ValueError as e:  # (an unbalanced IPv6 bracket)
            raise InvalidCallback(f"callback_url is not a URL: {e}") from None
        if parts.scheme not in _DEFAULT_PORTS or not url.lower().startswith(parts.scheme + "://"):
            raise InvalidCallback(f"callback_url must be an http:// or https:// URL, got {url!r}")
        if "@" in parts.netloc:
            raise InvalidCallback("callback_url must not carry a user name or password")
        if parts.fragment or url.endswith("#"):
            raise InvalidCallback("callback_url must not have a fragment")
        try:
            port = parts.port
            host = _host(parts.hostname or "")
        except ValueError as e:
            raise InvalidCallback(f"callback_url has a bad host or port: {e}") from None
        if port is None:
            port = _DEFAULT_PORTS[parts.scheme]
        if (host, None) not in self.allowed and (host, port) not in self.allowed:
            if not self.allowed:
                raise CallbackNotAllowed("this server sends no callbacks (the operator allows no callback host)")
            raise CallbackNotAllowed(f"callback host {parts.netloc!r} is not one the operator allows")
        return url


def sign(secret: bytes, timestamp: int, body: bytes) -> bytes:
    """
    The C{Twistedsse-Signature} header's value for C{body} sent at
    C{timestamp}: C{t=TIMESTAMP,v1=HEX}, HEX the HMAC-SHA256 of
    C{TIMESTAMP.BODY} keyed with C{secret}.
    """
    t = b"%d" % (timestamp,)
    mac = hmac.new(secret, t + b"." + body, hashlib.sha256).hexdigest()
    return b"t=" + t + b",v1=" + mac.encode("ascii")


def verifySignature(secret: bytes, header: bytes | str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """
    What a receiver does with a callback: whether C{header} (the
    C{Twistedsse-Signature} value) signs C{body} with C{secret}, at a time
    within C{tolerance} seconds of C{now} (older or newer: a replay, or a
    clock far off). Compared in constant time.
    """
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            return False
    fields = dict(part.partition("=")[::2] for part in header.split(","))
    t, v1 = fields.get("t", ""), fields.get("v1", "")
    if not t.isdigit() or len(t) > 12 or abs(now - int(t)) > tolerance:
        return False
    expected = hmac.new(secret, t.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1)


def payload(snapshot: JobSnapshot) -> bytes:
    """
    The body sent: the job as C{GET /renders/ID} describes it, without
    the three URL fields (paths on this server, which the receiver does
    not need: the id names the job).
    """
    return _json.dumps(snapshot.toJSON()).encode("utf-8")


class DeliveryError(Exception):
    """
    An attempt's answer says "try again" (a status other than 2xx and the
    final 4xx).
    """


#: How an attempt is made: C{post(url, body, headers)} fires with the
#: response's status once its body has been read (and discarded).
Post = Callable[[str, bytes, Mapping[bytes, bytes]], "Deferred[int]"]


def _final(status: int) -> bool:
    """
    Whether an answer ends a delivery: 2xx (delivered), or 4xx other than
    408 and 429 (refused, for good).
    """
    return 200 <= status < 300 or (400 <= status < 500 and status not in (408, 429))


@attrs.define(eq=False)
class _Delivery:
    jobID: str
    url: str
    body: bytes
    firstAt: float | None = None
    attempts: int = 0
    waiting: IDelayedCall | None = None
    #: Waiting for a slot: the semaphore's Deferred.
    queued: Deferred[Any] | None = None
    cancelled: bool = False


@attrs.define(eq=False)
class Webhooks:
    """
    Sends each ended job's JSON to its C{callback_url}, signed, retrying
    for a bounded time, never blocking anything else (see the module).

    @ivar post: makes one attempt (L{treqPost} in production).
    @ivar close: called once at L{stop}, after the last attempt ended
        (closes the connection pool).
    @ivar random: jitter in [0, 1) (C{random.random}; a test's own).
    """

    clock: IReactorTime
    secret: bytes
    policy: CallbackPolicy
    post: Post
    close: Callable[[], Deferred[None]] = lambda: succeed(None)
    timeout: float = ATTEMPT_TIMEOUT
    retryFor: float = RETRY_FOR
    backoffBase: float = BACKOFF_BASE
    backoffCap: float = BACKOFF_CAP
    maxConcurrent: int = MAX_CONCURRENT
    maxPending: int = MAX_PENDING
    random: Callable[[], float] = random.random
    _pending: set[_Delivery] = attrs.field(factory=set, init=False)
    _slots: DeferredSemaphore = attrs.field(init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _idle: list[Deferred[None]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = DeferredSemaphore(self.maxConcurrent)

    def pendingCount(self) -> int:
        """
        Deliveries not yet ended (in flight, waiting for a slot, or
        waiting to retry).
        """
        return len(self._pending)

    def backoff(self, attempts: int) -> float:
        """
        Seconds to wait after the C{attempts}-th failed attempt: full
        jitter under a ceiling that doubles from C{backoffBase} up to
        C{backoffCap}.
        """
        ceiling = min(self.backoffCap, self.backoffBase * 2.0 ** min(attempts - 1, 30))
        jitter: float = self.random()
        return ceiling * jitter

    def ended(self, snapshot: JobSnapshot) -> None:
        """
        A job ended: send it to its C{callback_url}, if it has one.
        """
        if snapshot.callbackURL is None:
            return
        if self._stopping:
            _log.warn("callback for render {jobID} not sent: the service is stopping", jobID=snapshot.id)
            return
        try:
            # Again: the job may have been created under another allow list
            # (before a restart with --state-dir, or by another instance).
            self.policy.check(snapshot.callbackURL)
        except (CallbackNotAllowed, InvalidCallback) as e:
            _log.warn("callback for render {jobID} not sent: {e}", jobID=snapshot.id, e=e)
            return
        if len(self._pending) >= self.maxPending:
            _log.warn(
                "callback for render {jobID} dropped: {n} deliveries are pending already, the limit",
                jobID=snapshot.id, n=len(self._pending),
            )
            return
        delivery = _Delivery(snapshot.id, snapshot.callbackURL, payload(snapshot))
        self._pending.add(delivery)
        self._attempt(delivery)

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.waiting = None
        acquired: Deferred[Any] = self._slots.acquire()
        delivery.queued = acquired

        def send(_: object) -> Deferred[int]:
            delivery.queued = None
            if delivery.firstAt is None:
                delivery.firstAt = self.clock.seconds()
            delivery.attempts += 1
            now = self.clock.seconds()
            headers = {
                b"Content-Type": b"application/json",
                b"User-Agent": b"twistedsse-webhook",
                SIGNATURE_HEADER: sign(self.secret, int(now), delivery.body),
            }
            d = maybeDeferred(self.post, delivery.url, delivery.body, headers)
            d.addTimeout(self.timeout, self.clock)
            return d.addBoth(release)

        def release(result: object) -> object:
            self._slots.release()
            return result

        acquired.addCallback(send).addCallbacks(
            self._answered, self._failed, callbackArgs=(delivery,), errbackArgs=(delivery,)
        )
        acquired.addErrback(lambda f: _log.failure("callback for render {jobID}", f, jobID=delivery.jobID))

    def _answered(self, status: int, delivery: _Delivery) -> None:
        if 200 <= status < 300:
            _log.info(
                "callback for render {jobID} delivered ({status}, attempt {n})",
                jobID=delivery.jobID, status=status, n=delivery.attempts,
            )
            self._done(delivery)
        elif _final(status):
            _log.warn(
                "callback for render {jobID} refused by its receiver ({status}): not retried",
                jobID=delivery.jobID, status=status,
            )
            self._done(delivery)
        else:
            self._retry(delivery, f"status {status}")

    def _failed(self, failure: Failure, delivery: _Delivery) -> None:
        if delivery.cancelled:
            # Waiting for a slot when the service stopped.
            _log.warn(
                "callback for render {jobID} cancelled after {n} attempts: the service is stopping",
                jobID=delivery.jobID, n=delivery.attempts,
            )
            self._done(delivery)
            return
        reason = f"timed out after {self.timeout:g} s" if failure.check(TimeoutError) else repr(failure.value)
        self._retry(delivery, reason)

    def _retry(self, delivery: _Delivery, reason: str) -> None:
        now = self.clock.seconds()
        delay = self.backoff(delivery.attempts)
        assert delivery.firstAt is not None
        if self._stopping:
            _log.warn(
                "callback for render {jobID} not retried: the service is stopping (attempt {n}: {reason})",
                jobID=delivery.jobID, n=delivery.attempts, reason=reason,
            )
            self._done(delivery)
        elif now + delay > delivery.firstAt + self.retryFor:
            _log.warn(
                "callback for render {jobID} given up after {n} attempts in {seconds:.0f} s (last: {reason})",
                jobID=delivery.jobID, n=delivery.attempts, seconds=now - delivery.firstAt, reason=reason,
            )
            self._done(delivery)
        else:
            _log.info(
                "callback for render {jobID} failed (attempt {n}: {reason}); again in {delay:.1f} s",
                jobID=delivery.jobID, n=delivery.attempts, reason=reason, delay=delay,
            )
            delivery.waiting = self.clock.callLater(delay, self._attempt, delivery)

    def _done(self, delivery: _Delivery) -> None:
        self._pending.discard(delivery)
        if not self._pending:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def start(self) -> None:
        self._stopping = False

    def stop(self) -> Deferred[None]:
        """
        Start no more attempts: cancel the retries that wait (logged with
        their job ids) and the deliveries that wait for a slot; fire once
        the attempts in flight have ended (each within its timeout) and
        the connections are closed.
        """
        self._stopping = True
        for delivery in list(self._pending):
            if delivery.waiting is not None:
                delivery.waiting.cancel()
                delivery.waiting = None
                _log.warn(
                    "callback for render {jobID} cancelled after {n} attempts: the service is stopping",
                    jobID=delivery.jobID, n=delivery.attempts,
                )
                self._done(delivery)
            elif delivery.queued is not None:
                delivery.cancelled = True
                delivery.queued.cancel()
        idle: Deferred[None] = Deferred()
        if self._pending:
            self._idle.append(idle)
        else:
            idle.callback(None)
        return idle.addCallback(lambda _: self.close())


#: Bytes of a receiver's answer read (and discarded); past it the
#: connection is closed: the status is all that counts.
MAX_ANSWER_BYTES = 64 * 1024


class _Discard(Protocol):
    """
    Reads an answer's body into nothing. C{done} fires once it has ended,
    or once C{limit} bytes came (the connection is then closed); cancelling
    C{done} (the attempt's timeout) closes the connection too: a receiver
    that trickles an endless body holds it no longer than the attempt.
    """

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.done: Deferred[None] = Deferred(lambda _: self._close())

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0 and not self.done.called:
            self.done.callback(None)
            self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # (twisted.web imported here, as in treqPost: the job modules that
        # import this one need none of it.)
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if not self.done.called:
            if reason.check(ResponseDone, PotentialDataLoss):
                self.done.callback(None)
            else:
                self.done.errback(reason)


def treqPost(reactor: IReactorTime, timeout: float = ATTEMPT_TIMEOUT) -> tuple[Post, Callable[[], Deferred[None]]]:
    """
    L{Webhooks.post} over treq with its own connection pool (closed by the
    second function returned): redirects are not followed, the answer's
    body is read and discarded.
    """
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IResponse

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    pool.cachedConnectionTimeout = 30
    client = treq.client.HTTPClient(Agent(reactor, connectTimeout=timeout, pool=pool))

    def post(url: str, body: bytes, headers: Mapping[bytes, bytes]) -> Deferred[int]:
        d = client.post(url, data=body, headers=Headers({k: [v] for k, v in headers.items()}),
                        allow_redirects=False, unbuffered=True)

        def read(response: IResponse) -> Deferred[int]:
            code: int = response.code
            body = _Discard(MAX_ANSWER_BYTES)
            response.deliverBody(body)
            return body.done.addCallback(lambda _: code)

        return d.addCallback(read)

    def close() -> Deferred[None]:
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed

    return post, close
