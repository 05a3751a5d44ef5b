"""
What one client may hold of the server's connections and time: how many
connections (in all and per client address), how long a request head may
take, how slowly a request body may come, and how many file descriptors
the process may open for all of it.

Twisted's only guard is its idle timer, reset by every byte: a client that
sends one byte every 50 s holds a connection forever, and so do a
thousand of them. Here the clock of a request runs from when it may start
to when it is whole, whatever the client sends meanwhile; once a request
is whole (a stream may then last for hours) no timer of this module runs.

Intentional divergences:
    - A connection whose request head has not started when its time is up
      is closed without an answer (as Apache does): no request to answer,
      and a client that reuses a kept-alive connection just as it closes
      would take a 408 for the answer to its next request. One that has
      sent part of a head gets C{408} JSON, then the close.
    - Loopback and UNIX-socket peers are by default exempt from the
      per-address cap (not from the total): behind a reverse proxy on the
      same host every client's connection comes from there.
"""

from __future__ import annotations

import ipaddress
import json
import resource
from typing import Callable

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime

#: Seconds a request head may take, by default.
REQUEST_TIMEOUT = 10.0
#: Bytes per second a request body must average, by default, once it has
#: had REQUEST_TIMEOUT seconds.
BODY_MIN_RATE = 1024
#: Connections open at once, by default (lowered to what the file limit
#: allows).
MAX_CONNECTIONS = 16384
#: Connections open at once from one (non-loopback) address, by default.
MAX_CONNECTIONS_PER_ADDRESS = 256
#: Event streams open at once, by default (lowered to what the file limit
#: allows).
MAX_STREAMS = 10000
#: Event streams open at once per render, by default.
MAX_STREAMS_PER_JOB = 1000
#: Seconds after the polite close of a timed-out connection before it is
#: aborted (a peer that does not read, or a TLS handshake never finished).
ABORT_AFTER = 2.0


@attrs.frozen
class ConnectionLimits:
    """
    The bounds on client connections.

    @ivar requestTimeout: seconds a request head may take (0: no limit),
        from when the connection opens, or, on a kept-alive connection,
        from the first byte of the next request (the idle time in between
        is Twisted's idle timeout's). Also the grace a body has before
        C{bodyMinRate} applies.
    @ivar bodyMinRate: bytes per second a request body must average once
        it has had C{requestTimeout} seconds (0: no minimum).
    @ivar maxConnections: connections open at once (0: no limit).
    @ivar maxPerAddress: connections open at once from one client address
        (0: no limit).
    @ivar limitLoopback: apply C{maxPerAddress} to loopback and UNIX
        peers too.
    """

    requestTimeout: float = REQUEST_TIMEOUT
    bodyMinRate: int = BODY_MIN_RATE
    maxConnections: int = 0
    maxPerAddress: int = 0
    limitLoopback: bool = False


def peerKey(address: IAddress) -> str | None:
    """
    The per-address key of a peer, or C{None} for a peer exempt from the
    per-address cap unless it is asked for (loopback, UNIX sockets).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    if (mapped or ip).is_loopback:
        return None
    if mapped is not None:
        return str(mapped)
    if ip.version == 6:
        # One IPv6 client is a /64 (a host picks any address in it at no
        # cost): cap the network, not each address.
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return host


@attrs.define
class ConnectionCounter:
    """
    The connections open now, in all and per client address, and whether
    one more may open. L{/healthz<twistedsse._app.TwistedSSEApp.healthz>}
    shows C{open} and C{max}.
    """

    limits: ConnectionLimits = ConnectionLimits()
    open: int = 0
    refused: int = 0
    _perAddress: dict[str, int] = attrs.field(factory=dict)

    @property
    def max(self) -> int:
        return self.limits.maxConnections

    def _key(self, address: IAddress) -> str | None:
        key = peerKey(address)
        if key is None and self.limits.limitLoopback:
            host = getattr(address, "host", None)
            key = host if isinstance(host, str) else "unix"
        return key

    def admit(self, address: IAddress) -> Callable[[], None] | None:
        """
        Count one more connection from C{address}, if the caps allow it.

        @return: what to call once it has closed, or C{None}: refused.
        """
        limits = self.limits
        if limits.maxConnections and self.open >= limits.maxConnections:
            self.refused += 1
            return None
        key = self._key(address)
        if key is not None and limits.maxPerAddress:
            if self._perAddress.get(key, 0) >= limits.maxPerAddress:
                self.refused += 1
                return None
            self._perAddress[key] = self._perAddress.get(key, 0) + 1
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            if key is not None and limits.maxPerAddress:
                left = self._perAddress[key] - 1
                if left:
                    self._perAddress[key] = left
                else:
                    del self._perAddress[key]

        return release

    def fromAddress(self, host: str) -> int:
        """
        Connections open now from C{host} (as counted for the per-address
        cap: an IPv6 address counts with its /64).
        """
        key = peerKey(type("Address", (), {"host": host})())
        return self._perAddress.get(key or host, 0)

    def toJSON(self) -> dict[str, int]:
        return {"open": self.open, "max": self.max}


class RequestClock:
    """
    The timers of one HTTP/1.1 connection's requests: the head must be
    whole within C{requestTimeout}, and a body must then average at least
    C{bodyMinRate} bytes/s once it has had C{requestTimeout} seconds. The
    connection tells it what happens (bytes arrive, a head is whole, a
    request is whole, a response has ended); when time is up it calls
    C{expire} with a reason, at most once.

    States: C{head} (waiting for a head; its timer runs), C{body} (a body
    is arriving; its rate is checked), C{busy} (a request is whole and
    being answered: no timer), C{idle} (a kept-alive connection between
    requests: Twisted's idle timeout's), C{off}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limits: ConnectionLimits,
        expire: Callable[[str, bool], None],
    ) -> None:
        self._clock = clock
        self._limits = limits
        self._expire = expire
        self._call: IDelayedCall | None = None
        self.state = "head"
        self._started = 0
        self._bodyStart = 0.0
        self._bodyBytes = 0
        self._pipelined = False
        self._arm(limits.requestTimeout, self._headTimedOut)

    def _arm(self, delay: float, what: Callable[[], None]) -> None:
        self._cancel()
        if delay > 0:
            self._call = self._clock.callLater(delay, what)

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _startHead(self) -> None:
        self.state = "head"
        self._started = 0
        self._arm(self._limits.requestTimeout, self._headTimedOut)

    def received(self, size: int) -> None:
        """
        C{size} bytes came from the client (before they are parsed).
        """
        if self.state == "idle":
            self._startHead()
        if self.state == "head":
            self._started += size
        elif self.state == "body":
            self._bodyBytes += size
        elif self.state == "busy":
            self._pipelined = True

    def headReceived(self, length: int | None) -> None:
        """
        A request head is whole; a body of C{length} bytes (C{None}:
        chunked) follows.
        """
        if self.state != "head":
            return
        if length == 0:
            self.requestReceived()
            return
        self.state = "body"
        self._bodyStart = self._clock.seconds()
        self._bodyBytes = 0
        if self._limits.bodyMinRate:
            self._arm(self._limits.requestTimeout, self._checkRate)
        else:
            self._cancel()

    def requestReceived(self) -> None:
        """
        A request is whole: it is being answered, with no timer.
        """
        if self.state == "off":
            return
        self._cancel()
        self.state = "busy"
        self._pipelined = False

    def responseEnded(self) -> None:
        """
        A response has ended and the connection stays open: wait for the
        next request's first byte, or, if bytes of it came already
        (pipelined), start its clock now.
        """
        if self.state != "busy":
            return
        if self._pipelined:
            self._startHead()
            self._started = 1
        else:
            self._cancel()
            self.state = "idle"

    def stop(self) -> None:
        """
        No more timers: the connection closed, or is no longer HTTP/1.1.
        """
        self._cancel()
        self.state = "off"

    def _headTimedOut(self) -> None:
        self._call = None
        self.state = "off"
        self._expire(f"the request head was not complete within {self._limits.requestTimeout:g} s", self._started > 0)

    def _checkRate(self) -> None:
        self._call = None
        rate = self._limits.bodyMinRate
        elapsed = self._clock.seconds() - self._bodyStart
        if self._bodyBytes >= rate * elapsed:
            # On pace: check again when the average would fall below.
            self._arm(max(self._bodyBytes / rate - elapsed, 0.001), self._checkRate)
            return
        self.state = "off"
        self._expire(
            f"the request body came slower than {rate} bytes/s ({self._bodyBytes} bytes in {elapsed:.1f} s)", True
        )


def timeoutResponse(detail: str) -> bytes:
    """
    The C{408} JSON answer, with its head, to a request not whole in time.
    """
    body = json.dumps({"error": "request_timeout", "detail": detail}).encode() + b"\n"
    return (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )


# -- the file descriptor budget ----------------------------------------------

#: Descriptors kept aside whatever the load: stdio, the log, the SQLite
#: store and its journal, the reactor's epoll and waker, an accept() spare.
FD_RESERVE = 64
#: Descriptors one running render holds: the child's stdin, stdout and
#: stderr pipes, and its output file.
FDS_PER_RENDER = 4


def raiseFileLimit() -> int:
    """
    Raise this process's soft C{RLIMIT_NOFILE} to its hard limit (as far
    as the kernel allows, if the hard limit is unlimited); return the soft
    limit now in force. The default soft limit (1 024) holds far fewer
    streams than C{--max-streams} allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fileReserve(listeners: int, maxRenders: int) -> int:
    """
    Descriptors that are not the clients' to take: the fixed reserve, one
    per listening socket, L{FDS_PER_RENDER} per render that may run.
    """
    return FD_RESERVE + listeners + FDS_PER_RENDER * maxRenders


def fileRoom(listeners: int, maxRenders: int, limit: int | None = None) -> int:
    """
    The descriptors left for client connections (and so for event
    streams) under the open-file C{limit} once L{fileReserve} is set
    aside; never less than one.

    @param limit: by default this process's soft limit as it stands:
        twistd raises it first (L{raiseFileLimit}); an application that
        embeds twistedsse owns its process's limits.
    """
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return max(MAX_CONNECTIONS, MAX_STREAMS)
    return max(limit - fileReserve(listeners, maxRenders), 1)


def defaultLimits(listeners: int, maxRenders: int, limit: int | None = None) -> ConnectionLimits:
    """
    The connection bounds twistd applies unless told otherwise: request
    timeouts, L{MAX_CONNECTIONS} (or what L{fileRoom} allows),
    L{MAX_CONNECTIONS_PER_ADDRESS} from each non-loopback address.
    """
    return ConnectionLimits(
        maxConnections=min(MAX_CONNECTIONS, fileRoom(listeners, maxRenders, limit)),
        maxPerAddress=MAX_CONNECTIONS_PER_ADDRESS,
    )


def checkFileBudget(limit: int, reserve: int, **wanted: int) -> None:
    """
    Refuse a count of connections or streams (each one descriptor) that
    does not fit in the file limit once the reserve is set aside.

    @param wanted: option name (C{max_streams}) to the value asked for.
    @raise ValueError: naming the option, the limit and how to raise it.
    """
    room = limit - reserve
    for name, value in wanted.items():
        if value > room:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value} cannot be held: the open-file limit is {limit}, and {reserve} "
                f"descriptors are kept for listeners, renders, the store and logs, which leaves {room}. "
                f"Lower {flag}, or raise the limit (systemd: LimitNOFILE= in the unit; a shell: ulimit -n)."
            )
