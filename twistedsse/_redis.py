"""
Where Redis is and how to reach it: C{--redis redis://HOST:PORT/DB} (or
C{rediss://} for TLS), with the password from a file, never from the
command line (where C{ps} and shell history would show it).

Connections are txredisapi's (a Twisted-native client: reactor-agnostic, so
an application that embeds twistedsse keeps its reactor), always with
C{convertNumbers=False} (its default turns C{"0019"} into 19 and
C{"12.5"} into a float: stream values must stay the strings written) and a
connect timeout (a connection to a closed port with reconnect on otherwise
never fires). Stream commands (XADD, XREAD, XREADGROUP...) go through
C{execute_command}: the client has no methods for them.

A blocking read (C{XREAD BLOCK}) holds its connection until it returns, so
it gets a connection of its own: a command sent behind it would wait for
the block.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Seconds to wait for a connection (and its AUTH and SELECT).
CONNECT_TIMEOUT = 5.0

#: The longest wait between two tries to reconnect, in seconds.
MAX_RECONNECT_DELAY = 2.0


class RedisConfigError(ValueError):
    """
    A C{--redis} URL or password file that cannot be used; the message
    says which part and why.
    """


_log = Logger()


@attrs.frozen
class RedisEndpoint:
    """
    One Redis server and database.

    @ivar password: from the password file, if any (C{repr} hides it).
    """

    host: str
    port: int
    db: int
    tls: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=lambda value: "<hidden>" if value else "None")

    @classmethod
    def fromURL(cls, url: str, passwordFile: str | Path | None = None) -> RedisEndpoint:
        """
        Parse C{redis://HOST[:PORT][/DB]} or C{rediss://...}. A password in
        the URL is refused: it belongs in C{passwordFile} (its first line;
        surrounding whitespace dropped). A user name may be in the URL
        (C{redis://USER@HOST/0}, for Redis 6 ACLs).

        @raise RedisConfigError: naming what is wrong.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise RedisConfigError(f"--redis {url!r}: the scheme must be redis:// or rediss://")
        if parts.password is not None:
            raise RedisConfigError(
                "--redis: a password in the URL would show in ps and shell history; "
                "put it in a file and give --redis-password-file"
            )
        if parts.query or parts.fragment:
            raise RedisConfigError(f"--redis {url!r}: no query or fragment is understood")
        host = parts.hostname
        if not host:
            raise RedisConfigError(f"--redis {url!r}: no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise RedisConfigError(f"--redis {url!r}: the port is not a number from 1 to 65535") from None
        path = parts.path.strip("/")
        if path and not (path.isdigit() and path.isascii()):
            raise RedisConfigError(f"--redis {url!r}: the path must be a database number, e.g. /0")
        db = int(path) if path else 0
        password = readPassword(passwordFile) if passwordFile is not None else None
        username = unquote(parts.username) if parts.username else None
        return cls(host=host, port=port, db=db, tls=parts.scheme == "rediss", username=username, password=password)

    def describe(self) -> str:
        """
        The URL without the password, for logs.
        """
        user = f"{self.username}@" if self.username else ""
        return f"{'rediss' if self.tls else 'redis'}://{user}{self.host}:{self.port}/{self.db}"

    def connect(
        self, *, reconnect: bool = True, protocol: type | None = None, onConnectionMade: Callable[[], None] | None = None
    ) -> Any:
        """
        A lazy txredisapi connection handler: returned at once, it sends
        each command once connected and, with C{reconnect}, reconnects
        after a loss, waiting at most L{MAX_RECONNECT_DELAY} between tries
        (txredisapi's own connections wait up to 10 s: after Redis comes
        back, requests would get 503 that long). Call its C{disconnect()}
        to stop it: that also stops the reconnecting. L{ready} waits for
        it. A blocking read loop gets a connection of its own.

        @param protocol: the connection's protocol class, if not
            txredisapi's (a C{SubscriberProtocol} for pub/sub).
        @param onConnectionMade: called each time the connection is made
            (again, after a loss: counted for /metrics).
        """
        import txredisapi
        from twisted.internet import reactor
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        from ._transport import EagerSendReactor

        factory = _keepTrying()(
            f"{self.host}:{self.port}", self.db, 1, isLazy=True, handler=txredisapi.ConnectionHandler,
            charset="utf-8", password=self.password, replyTimeout=None, convertNumbers=False,
            username=self.username,
        )  # fmt: skip
        factory.reconnect = reconnect
        factory.maxDelay = MAX_RECONNECT_DELAY
        factory.onConnectionMade = onConnectionMade
        factory.protocol = _unpaused(protocol or txredisapi.RedisProtocol)
        # The global reactor, as txredisapi's own connections use; commands
        # leave in the write, not at the reactor's next turn.
        tcp = HostnameEndpoint(EagerSendReactor(reactor), self.host, self.port, timeout=CONNECT_TIMEOUT)
        factory.startConnecting(wrapClientTLS(self.tlsOptions(), tcp) if self.tls else tcp)
        return factory.handler

    def tlsOptions(self) -> Any:
        """
        The TLS client options for C{rediss://}: the server's certificate
        checked against the system's trust roots and C{host}.
        """
        from twisted.internet import ssl

        return ssl.optionsForClientTLS(self.host)


class _ParseInOneGo:
    """
    Parse a reply in the call that received it. txredisapi's line reader
    pauses its transport after each bulk string of a reply and goes on at
    the reactor's next turn (C{setLineMode}: C{pauseProducing}, then
    C{callLater(0)}): an C{XREAD} reply of one event is five turns, each
    with two C{epoll_ctl}s, on the path of every event to its clients
    (measured by the benchmark: docs/performance.md, Redis mode). Here the
    rest of the data is parsed at once, in a loop (not recursively: a
    history of a thousand events is thousands of bulk strings).
    """

    _rest: bytes = b""
    _parsing: bool = False

    def connectionMade(self) -> Any:
        # (For /metrics: the connection's reconnects, see connect.)
        made = getattr(getattr(self, "factory", None), "onConnectionMade", None)
        if made is not None:
            made()
        return super().connectionMade()  # type: ignore[misc]

    def setLineMode(self, extra: bytes = b"") -> None:
        self.line_mode = 1
        if extra:
            self._rest += extra

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        if self._parsing:
            # (Not reached from the reactor; a reentrant call appends.)
            self._rest += data
            return None
        self._parsing = True
        try:
            why = super().dataReceived(data)  # type: ignore[misc]
            while self._rest and not why and not (self.transport and self.transport.disconnecting):  # type: ignore[attr-defined]
                rest, self._rest = self._rest, b""
                why = super().dataReceived(rest)  # type: ignore[misc]
            return why
        finally:
            self._parsing = False


@cache
def _keepTrying() -> type:
    """
    txredisapi's factory, except that a failed handshake does not end the
    reconnecting. txredisapi stops reconnecting for good when its AUTH or
    SELECT fails, even when the connection was lost in the middle of it: a
    reconnect that reached a restarting Redis (the old process's backlog)
    left the instance answering 503 until it was restarted itself (found by
    the metrics' reconnect test, once in a CI run). Here the failure is
    logged (once until the next success, not at every retry), the
    connection is closed as txredisapi does, and the factory tries again
    with its backoff: a wrong password is the start-up check's to refuse
    (L{checkNow}); one changed under a running service is retried, logged.
    Only C{disconnect()} stops it. (Made on first use: importing
    txredisapi imports the global reactor.)
    """
    import txredisapi

    class KeepTryingFactory(txredisapi.RedisFactory):  # type: ignore[misc]
        _failing: str | None = None

        def stopTrying(self) -> Deferred[None]:
            # (Called by txredisapi's handshake alone: we never call it,
            # nor its quit() or shutdown().)
            if not self.reconnect:
                return super().stopTrying()  # type: ignore[no-any-return]
            return succeed(None)

        def connectionError(self, why: str) -> None:
            # (txredisapi errbacks a Deferred no lazy caller holds: an
            # "Unhandled error in Deferred" at garbage collection.)
            if why != self._failing:
                _log.warn("Redis {url}: {why}; trying again", url=self.uuid, why=why)
            self._failing = why

        def addConnection(self, conn: Any) -> None:
            # (A handshake succeeded: the next failure is news again.)
            self._failing = None
            super().addConnection(conn)

    return KeepTryingFactory


def _unpaused(protocol: type) -> type:
    """
    C{protocol} (txredisapi's, or a subclass such as a subscriber) with
    L{_ParseInOneGo}.
    """
    return type(f"Unpaused{protocol.__name__}", (_ParseInOneGo, protocol), {})


def readPassword(path: str | Path) -> str:
    """
    The first line of C{path}, stripped.

    @raise RedisConfigError: the file cannot be read, or is empty.
    """
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline(4097)
    except (OSError, UnicodeDecodeError) as e:
        raise RedisConfigError(f"--redis-password-file {path}: {getattr(e, 'strerror', None) or e}") from None
    password = line.strip()
    if not password:
        raise RedisConfigError(f"--redis-password-file {path}: the file is empty")
    if len(password) > 4096:
        raise RedisConfigError(f"--redis-password-file {path}: over 4 096 characters")
    return password


def ready(connection: Any, clock: IReactorTime, timeout: float = CONNECT_TIMEOUT) -> Deferred[None]:
    """
    Fire once C{connection} (from L{RedisEndpoint.connect}) answers
    C{PING}; fail with C{TimeoutError} after C{timeout} seconds (a
    reconnecting connection to a server that is down never answers, and
    never fails by itself).
    """
    d: Deferred[Any] = connection.execute_command("PING")
    d.addTimeout(timeout, clock)
    return d.addCallback(lambda _: None)


def _encode(*parts: str | int) -> bytes:
    """
    One command in RESP, the Redis protocol.
    """
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = str(part).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def checkNow(endpoint: RedisEndpoint, timeout: float = CONNECT_TIMEOUT) -> None:
    """
    Connect, authenticate, select the database and C{PING}, blocking, once:
    at start-up, before the reactor runs, so that a wrong password or an
    unreachable server stops the service from starting (twistd exits
    non-zero with the message) instead of a reconnecting connection
    retrying it forever. Three short commands whose replies are one line
    each, so a plain socket does (the service's own connections are
    txredisapi's).

    A server still loading its data (C{LOADING}) passes: it is there and
    took the credentials, and the service waits for it as for a restart.

    @raise RedisConfigError: what is wrong (the credentials, the database,
        or no answer within C{timeout}), never with the password.
    """
    import socket
    import ssl

    where = endpoint.describe()
    commands: list[tuple[str | int, ...]] = []
    if endpoint.password is not None:
        if endpoint.username is not None:
            commands.append(("AUTH", endpoint.username, endpoint.password))
        else:
            commands.append(("AUTH", endpoint.password))
    commands.append(("SELECT", endpoint.db))
    commands.append(("PING",))
    try:
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as e:
        raise RedisConfigError(f"Redis at {where} cannot be reached: {e.strerror or e}") from None
    try:
        conn: socket.socket = raw
        if endpoint.tls:
            conn = ssl.create_default_context().wrap_socket(raw, server_hostname=endpoint.host)
        conn.sendall(b"".join(_encode(*command) for command in commands))
        replies = conn.makefile("rb")
        for command in commands:
            line = replies.readline(4096)
            if not line:
                raise RedisConfigError(f"Redis at {where} closed the connection at {command[0]}")
            if line.startswith(b"-"):
                text = line[1:].decode("utf-8", "replace").strip()
                if text.startswith("LOADING") and command[0] != "AUTH":
                    # Up and the credentials taken, still loading its data
                    # (a large append-only file): the service starts and
                    # answers 503 until Redis is ready, as after a restart.
                    return
                if command[0] == "AUTH" or text.startswith(("NOAUTH", "WRONGPASS")):
                    raise RedisConfigError(
                        f"Redis at {where} refused the credentials (check --redis-password-file): {text.split(' ')[0]}"
                    )
                raise RedisConfigError(f"Redis at {where} refused {command[0]}: {text}")
    except (OSError, ssl.SSLError) as e:
        raise RedisConfigError(f"Redis at {where} did not answer within {timeout:g} s: {e}") from None
    finally:
        raw.close()
