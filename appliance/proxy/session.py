"""What every session does, whatever the protocol: setup, timeouts, relay, goodbye, logs.

A session runs in three phases. Before login the protocol subclass parses both sides and
replies to the client itself. After a successful login both connections are joined into a byte
relay. At the end both sides are closed and one summary line is logged. A session keeps the
config snapshot that it started with, whatever reloads happen meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import ssl
import time
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loguru import logger

from appliance import metrics
from appliance.config import AppConfig, ListenerConfig, UpstreamConfig
from appliance.logs import RepeatLimiter, escape
from appliance.protocols import sasl
from appliance.protocols.capabilities import ClientSideState
from appliance.protocols.errors import (
    ClientProtocolError,
    TooManyProtocolErrors,
    UpstreamProtocolError,
)
from appliance.protocols.proxy_header import (
    ProxyHeader,
    ProxyHeaderError,
    build_v2_header,
    canonical_ip,
    may_start_header,
    starts_like_header,
)
from appliance.proxy.connection import (
    Connection,
    ConnectionClosed,
    close_flushed,
    join,
)
from appliance.proxy.errors import UpstreamError
from appliance.proxy.guard import ClientGuard, format_login_outcome
from appliance.proxy.proxy_protocol import read_proxy_header
from appliance.proxy.relay import IdleTimer, first_closed, relay_outcome
from appliance.proxy.routing import Route, resolve_route, routed_config
from appliance.proxy.upstream import (
    UpstreamTarget,
    describe_tls_error,
    remember_tls_session,
)
from appliance.tls.contexts import TlsContexts


@dataclass(frozen=True)
class Snapshot:
    """One validated config with its TLS contexts; sessions keep the one they started with."""

    config: AppConfig
    contexts: TlsContexts
    version: int = 1


@dataclass
class SessionEnv:
    """Everything a session needs from the runtime, fixed when the client connects."""

    listener_name: str
    snapshot: Snapshot
    # Returns the concrete upstream targets to try for (upstream name, protocol), in
    # order. A session routed by login passes its routed snapshot as a third argument.
    plan_upstream: Callable[..., Any]
    on_finished: Callable[[Session], None] = lambda session: None
    # Receives (protocol, target, upstream connection or None, UpstreamError or None)
    # after each upstream setup attempt, so `tls: auto` can check its learned records.
    # The keyword `log` is the session's logger, for warnings about the attempt.
    report_upstream: Callable[..., None] = lambda *outcome, **options: None
    # The runtime passes one guard to every session; a private one suits tests only.
    guard: ClientGuard = field(default_factory=ClientGuard)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def listener(self) -> ListenerConfig:
        return self.snapshot.config.listeners[self.listener_name]


# Last words before the proxy closes a session that has not logged in, by reason. Each
# protocol adds its response code for a temporary failure, except for CLIENT_FAULTS.
GOODBYE_TEXTS = {
    "timeout": "Timed out waiting for login",
    "unavailable": "Mail server unavailable, try again later",
    "shutdown": "Server shutting down, try again later",
    "protocol": "Too many invalid commands or rejected logins",
    "unreadable": "Closing the connection after input that cannot be read further",
    "internal": "Internal error, try again later",
    "busy": "Too many connections, try again later",
}
CLIENT_FAULTS = frozenset({"protocol", "unreadable"})

# Largest user name and password, in bytes, that the proxy forwards to an upstream.
# Dovecot 2.3's login processes (2.3.19 tested) close the connection on a SASL response
# over 8192 bytes of base64 (LOGIN_MAX_AUTH_BUF_SIZE in src/login-common/client-common.h),
# and a PLAIN response with both values at these limits is 6832 bytes of base64.
# NOTE: Dovecot reads LOGIN (IMAP) and USER/PASS (POP3) into a smaller buffer
# (LOGIN_MAX_INBUF_SIZE, 1026 to 1856 bytes by version). The proxy uses those commands
# only when the upstream offers no PLAIN mechanism, and then shorter values may fail.
MAX_LOGIN_USER_SIZE = 1024
MAX_LOGIN_PASSWORD_SIZE = 4096
# Largest base64 SASL response that can carry credentials within those limits: a PLAIN
# message whose authorization identity equals the user name, with two NUL separators.
MAX_SASL_RESPONSE_SIZE = 4 * -(-(2 * MAX_LOGIN_USER_SIZE + MAX_LOGIN_PASSWORD_SIZE + 2) // 3)
LOGIN_SIZE_ERROR = (
    f"User names are limited to {MAX_LOGIN_USER_SIZE} bytes "
    f"and passwords to {MAX_LOGIN_PASSWORD_SIZE} bytes"
)
# OpenSSL's reasons (3.0) for a first record that is no TLS record at all: its version
# bytes are not 3.x, or it starts like an HTTP request. The client likely spoke plain text.
PLAINTEXT_HANDSHAKE_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}
)
# A warning about a client set up for the wrong kind of port is logged once a minute
# per listener and kind, and its repeats at DEBUG, so that a scanner cannot flood the log.
CLIENT_SETUP_WARNING_INTERVAL = 60.0
CLIENT_SETUP_WARNINGS = RepeatLimiter(CLIENT_SETUP_WARNING_INTERVAL)


# The pre-auth timeout of the session that runs in the current task, and the time at
# which it was first due. A context variable, because each session runs in its own
# task, and an attribute would enlarge every idle session.
_pre_auth_deadline: ContextVar[tuple[asyncio.Timeout, float] | None] = ContextVar(
    "pre_auth_deadline", default=None
)
# Response codes of a refused login that blame the server, not the credentials:
# UNAVAILABLE and SERVERBUG of IMAP (RFC 5530), SYS/TEMP and SYS/PERM of POP3
# (RFC 3206). Dovecot sends them when its password database cannot be reached.
SERVER_FAULT_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "SYS/TEMP", "SYS/PERM"})


def refused_login_result(code: str | None) -> str:
    """Return the login result for a server's refusal with response code `code`.

    `unavailable` when the code blames the server, so that an outage of a password
    database neither grows the failed-login delay nor bans users through fail2ban.
    """
    name = code.split(maxsplit=1)[0].upper() if code and code.strip() else ""
    return "unavailable" if name in SERVER_FAULT_CODES else "failed"


def _describe_addressless_header(header: ProxyHeader) -> str:
    """Return how the log names a PROXY header that carries no client address."""
    if header.version == 1:
        # The only version 1 line without addresses.
        return "PROXY v1 UNKNOWN header"
    if header.command == "LOCAL":
        return "PROXY v2 LOCAL header"
    return "PROXY v2 header of family UNSPEC or UNIX"


def decode_login(login: bytes) -> str:
    """Decode a login for Session.user, keeping invalid UTF-8 bytes as the log shows them.

    The surrogateescape handler lets `logs.escape` print every byte as the client sent it.
    """
    return login.decode("utf-8", "surrogateescape")


class SessionEnd(Exception):
    """Stop the session quietly; the reason goes to the summary log line."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class Session:
    """Base class of the IMAP and POP3 sessions."""

    protocol: ClassVar[str]
    # Attributes that only the login phase reads. They start as None, and the relay sets
    # them to None again, so an idle session keeps no parser or capability list.
    pre_auth_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, env: SessionEnv, client: Connection) -> None:
        self.env = env
        self.id = secrets.token_hex(4)
        self.client = client
        self.upstream: Connection | None = None
        self.upstream_target: UpstreamTarget | None = None
        self.phase = "pre-auth"
        self.outcome = "closed"
        # The login as the client sent it, which the login log lines name. With routing
        # by login it keeps the server part that the upstream does not receive.
        self.user: str | None = None
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        peer = client.extra("peername") or ("?", 0)
        # The TCP peer, which is a load balancer when a PROXY header names the client.
        self.peer_address = f"{peer[0]}:{peer[1]}"
        # The real client: the TCP peer, or the source of an accepted PROXY header.
        self.client_address = self.peer_address
        # Address that the client connected to, for the PROXY header sent upstream.
        self.client_destination: tuple[str, int] | None = client.extra("sockname")
        # A listener that accepts PROXY headers closes an untrusted peer that sends one.
        self.close_on_proxy_header = False
        # A TLS ClientHello as the first client bytes on a plaintext port ends the
        # session at once instead of at the pre-auth timeout.
        self.check_for_client_hello = env.listener.tls != "implicit"
        # Set for a listener that routes by login, once a login names its server.
        self.route: Route | None = None
        self.route_snapshot: Snapshot = env.snapshot
        # Key of this session in the guard's count of open sessions, once counted.
        self.address_key: str | None = None
        self.log = logger.bind(
            session=self.id, listener=env.listener_name, client=self.client_address
        )
        # Invalid commands, rejected logins and cancelled SASL exchanges so far.
        self.errors = 0
        # True while the proxy forwards a login to the upstream, from the end of the
        # failed-login delay until record_login logs the outcome. An upstream failure
        # or the pre-auth timeout meanwhile logs the login as `unavailable`.
        self.forwarding_login = False
        # Upstream of the last routed login that failed, for the session's end line.
        self.dropped_upstream: str | None = None
        # CPython 3.11 keeps one key table for the instance dicts of a class, and each new
        # instance leaves less room in it for names that no instance has set yet. A name
        # first set after that room is gone gives every session a dict of its own, about
        # 1.2 KiB more. So every attribute that a session sets is first set here, where
        # the first instance puts all the names into the table.
        for name in self.pre_auth_state:
            setattr(self, name, None)

    @property
    def limits(self):
        return self.env.snapshot.config.limits

    @property
    def client_host(self) -> str:
        """IP address of the client, without the port of `client_address`."""
        host = self.client_address.rpartition(":")[0]
        return host.strip("[]") or self.client_address

    @property
    def client_port(self) -> str:
        return self.client_address.rpartition(":")[2]

    @property
    def client_state(self) -> ClientSideState:
        listener = self.env.listener
        return ClientSideState(
            offers_starttls=listener.tls == "starttls",
            tls_active=self.client.tls_info is not None,
            allow_plaintext_login=listener.allow_plaintext_login,
        )

    # Protocol hooks

    async def pre_auth(self) -> bool:
        """Run the protocol until login succeeds (True) or the client leaves (False)."""
        raise NotImplementedError

    def goodbye(self, kind: str) -> bytes:
        """Return the protocol's last words before closing for `kind`."""
        raise NotImplementedError

    async def _challenge(self, data: bytes) -> bytes:
        """Send a SASL challenge in the protocol's form and return the client's reply."""
        raise NotImplementedError

    async def read_sasl_login(self, initial: bytes | None) -> tuple[bytes, bytes]:
        """Return the user and password of a SASL LOGIN exchange, asking for each.

        `initial` is the user name sent with the command (SASL-IR), or None.
        """
        user_challenge, password_challenge = sasl.LOGIN_CHALLENGES
        if initial is None:
            initial = await self._challenge(user_challenge)
        user = sasl.decode_login_step(initial)
        password_step = await self._challenge(password_challenge)
        return user, sasl.decode_login_step(password_step)

    # Lifecycle

    async def run(self) -> None:
        # At DEBUG, because the end line names the client too and each line costs CPU.
        self.log.debug("session started: client {}", self.client_address)
        try:
            await self._run_phases()
        except asyncio.CancelledError:
            self.outcome = self.outcome if self.outcome != "closed" else "cancelled"
            # A shutdown while a login is forwarded: the server gave no verdict.
            self._record_unavailable_login()
        except Exception:  # noqa: BLE001 - the session boundary: log, close, keep serving
            self.outcome = "internal error"
            self.log.opt(exception=True).error("session failed with an internal error")
            self._record_unavailable_login()
            self._say_goodbye("internal")
        finally:
            await self._close()
            self._release_client()
            self._log_summary()
            metrics.record_session_end(self)
            self.env.on_finished(self)

    async def _run_phases(self) -> None:
        if not await self._accept_proxy_header():
            return
        if self.env.extra.get("over_limit"):
            await self._reject_over_limit()
            return
        try:
            logged_in = await self._pre_auth_phase()
        except TimeoutError:
            self.outcome = "pre-auth timeout"
            self._record_unavailable_login()
            self._say_goodbye("timeout")
            return
        except UpstreamError as exc:
            self.outcome = f"upstream {exc.reason}"
            self.log.warning("upstream {} unusable: {}", self._upstream_label(), exc.detail)
            self._record_unavailable_login()
            self._say_goodbye("unavailable")
            return
        except UpstreamProtocolError as exc:
            self.outcome = "upstream protocol error"
            self.log.warning("upstream {} sent an invalid response: {}", self._upstream_label(), exc.message)
            self._record_unavailable_login()
            self._say_goodbye("unavailable")
            return
        except ClientProtocolError as exc:
            self.outcome = "client protocol error"
            self.log.info("closing after client protocol error: {}", exc.message)
            # Otherwise the input is out of sync, and the reply already gave the reason.
            too_many = isinstance(exc, TooManyProtocolErrors)
            self._say_goodbye("protocol" if too_many else "unreadable")
            return
        except (ConnectionClosed, ConnectionError):
            self.outcome = "client disconnected before login"
            return
        except SessionEnd as end:
            self.outcome = end.outcome
            return
        if logged_in:
            await self._relay()
        elif self.outcome == "closed":
            self.outcome = "logged out before login"

    async def _pre_auth_phase(self) -> bool | None:
        """Run the client's TLS handshake and login under the pre-auth timeout.

        A method of its own, so that the relay's suspended frames hold no timeout.
        """
        async with asyncio.timeout(self.limits.pre_auth_timeout) as deadline:
            when = deadline.when()
            assert when is not None
            token = _pre_auth_deadline.set((deadline, when))
            try:
                if self.env.listener.tls == "implicit":
                    await self._client_handshake()
                if not self._admit_client():
                    return False
                return await self.pre_auth()
            finally:
                _pre_auth_deadline.reset(token)

    async def next_client_event(self, reader: Any) -> Any:
        """Return the next event of a sans-IO client reader, reading as needed."""
        if self.close_on_proxy_header:
            await self._check_unexpected_proxy_header()
        if self.check_for_client_hello:
            await self._check_unexpected_client_hello()
        return await _next_event(reader, self.client)

    async def next_upstream_event(self, reader: Any) -> Any:
        """Return the next event of a sans-IO upstream reader, reading as needed."""
        assert self.upstream is not None
        try:
            return await _next_event(reader, self.upstream)
        except ConnectionClosed:
            raise UpstreamError("closed", "connection closed during login") from None

    async def connect_upstream(self, setup: Callable[[UpstreamTarget], Any]) -> None:
        """Try the planned targets in order until `setup` succeeds on one."""
        if self.route is not None:
            name = self.route.upstream
            routed: tuple[Snapshot, ...] = (self.route_snapshot,)
        else:
            name = self.env.listener.upstream
            routed = ()
        assert name is not None
        targets = await self.env.plan_upstream(name, self.protocol, *routed)
        failure: UpstreamError | None = None
        for target in targets:
            self.upstream_target = target
            try:
                async with asyncio.timeout(self.limits.connect_timeout):
                    await setup(target)
                self.env.report_upstream(
                    self.protocol, target, self.upstream, None, *routed, log=self.log
                )
                assert self.upstream is not None
                ssl_object = self.upstream.extra("ssl_object")
                if ssl_object is not None:
                    metrics.record_upstream_handshake(
                        target.name, ssl_object.session_reused
                    )
                return
            except TimeoutError:
                failure = UpstreamError("timeout", f"{target.address}: setup timed out")
            except (UpstreamError, UpstreamProtocolError) as exc:
                failure = exc if isinstance(exc, UpstreamError) else UpstreamError(
                    "protocol", f"{target.address}: {exc.message}"
                )
            self.env.report_upstream(
                self.protocol, target, None, failure, *routed, log=self.log
            )
            if self.upstream is not None:
                self.upstream.abort()
                self.upstream = None
            if len(targets) > 1:
                self.log.debug("upstream attempt {} failed: {}", target.mode, failure.detail)
        assert failure is not None
        raise failure

    def upstream_config(self, target: UpstreamTarget) -> UpstreamConfig:
        """Return the config of `target`, with the routed host for a host rule."""
        return self.route_snapshot.config.upstreams[target.name]

    def upstream_preface(self, target: UpstreamTarget) -> bytes:
        """Return the bytes to send before anything else: a PROXY v2 header or none."""
        if self.upstream_config(target).send_client_address != "proxy_v2":
            return b""
        source = (self.client_host, int(self.client_port))
        destination = self.client_destination or source
        try:
            return build_v2_header(source, (destination[0], destination[1]))
        except ValueError as exc:
            raise UpstreamError(
                "connect", f"cannot build a PROXY header for {target.name}: {exc}"
            ) from None

    @property
    def client_ip(self) -> str:
        """Client IP address in standard form, IPv4-mapped IPv6 as IPv4."""
        try:
            return canonical_ip(self.client_host)
        except ValueError:
            return self.client_host

    # Routing by login

    @property
    def routes_by_login(self) -> bool:
        return self.env.listener.route_by_login is not None

    def choose_route(self, login: bytes) -> bool:
        """Set the route of a login; return False when the allow-list rejects it."""
        routing = self.env.listener.route_by_login
        assert routing is not None
        config = self.env.snapshot.config
        route = resolve_route(login, routing, config.upstreams)
        if route is None:
            self.log.debug("login names no server on the allow-list; not connecting")
            return False
        self.route = route
        self.route_snapshot = dataclasses.replace(
            self.env.snapshot, config=routed_config(config, route)
        )
        self.log.info(
            "routing login to upstream {} (server {})", route.upstream, route.server
        )
        return True

    async def connect_route(self, setup: Callable[[UpstreamTarget], Any]) -> None:
        """Connect the upstream that the chosen route names.

        A failure counts as a failed login for the failed-login delay. The reply to it
        differs from a rejected or failed login, so without the delay a client could
        test quickly which allowed servers exist and accept connections.
        """
        try:
            await self.connect_upstream(setup)
        except (UpstreamError, UpstreamProtocolError):
            self.env.guard.record_login(self.client_host, self.limits, succeeded=False)
            raise

    def drop_route(self) -> None:
        """Close the upstream of a failed routed login; the next login starts anew."""
        if self.upstream_target is not None:
            self.dropped_upstream = self._upstream_label()
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self.upstream_target = None
        self.route = None
        self.route_snapshot = self.env.snapshot

    # PROXY protocol from load balancers

    async def _accept_proxy_header(self) -> bool:
        """Read the PROXY header that the listener expects; False closes the session."""
        settings = self.env.listener.proxy_protocol
        if not settings.accept:
            return True
        if not settings.trusts(self.client_host):
            if not settings.required:
                self.close_on_proxy_header = True
                return True
            self.outcome = "rejected: not from a trusted PROXY network"
            self.log.warning(
                "closing connection from {}: this listener requires a PROXY header, "
                "which only proxy_protocol.trusted_networks may send",
                self.peer_address,
            )
            return False
        try:
            header = await read_proxy_header(self.client, settings)
        except TimeoutError:
            self.outcome = "rejected: no PROXY header"
            self.log.warning(
                "closing connection from {}: no PROXY header within {:g}s",
                self.peer_address,
                settings.timeout,
            )
            return False
        except ProxyHeaderError as exc:
            self.outcome = "rejected: invalid PROXY header"
            self.log.warning(
                "closing connection from {}: {}", self.peer_address, exc.message
            )
            return False
        except (ConnectionClosed, ConnectionError):
            self.outcome = "client disconnected before login"
            return False
        if header is not None:
            self._use_proxy_header(header)
        return True

    def _use_proxy_header(self, header: ProxyHeader) -> None:
        # The header is not application data, which is all that bytes_received counts.
        self.client.bytes_received -= header.size
        if header.source is None:
            self.log.info(
                "{} from {} names no client address, so logs and limits use {}",
                _describe_addressless_header(header),
                self.peer_address,
                self.peer_address,
            )
            return
        host, port = header.source
        self.client_address = f"{canonical_ip(host)}:{port}"
        self.client_destination = header.destination
        self.log = logger.bind(
            session=self.id, listener=self.env.listener_name, client=self.client_address
        )
        self.log.info(
            "PROXY v{} header from {}: client {}",
            header.version,
            self.peer_address,
            self.client_address,
        )

    async def _check_unexpected_client_hello(self) -> None:
        self.check_for_client_hello = False
        data = await self.client.read_some()
        # A record header split after its first byte still counts. The pre-auth
        # timeout bounds the wait for the second byte.
        while data == b"\x16":
            more = await self.client.read_some()
            if not more:
                break
            data += more
        self.client.push_back(data)
        # A TLS handshake record: content type 22, then major version 3. Neither byte
        # can start an IMAP tag or a POP3 command.
        if data[:2] == b"\x16\x03":
            self.warn_client_setup(
                "tls_on_plaintext_port",
                "closing connection from {}: it started a TLS handshake on a plaintext "
                "port; the client expects implicit TLS (tls: implicit on the listener, "
                "or STARTTLS in the client)",
                self.peer_address,
            )
            raise SessionEnd("rejected: TLS handshake on a plaintext port")

    async def _check_unexpected_proxy_header(self) -> None:
        self.close_on_proxy_header = False
        data = await self.client.read_some()
        # A header split inside its signature still counts. The pre-auth timeout bounds
        # the wait for the rest.
        while may_start_header(data):
            more = await self.client.read_some()
            if not more:
                break
            data += more
        self.client.push_back(data)
        if starts_like_header(data):
            self.log.warning(
                "closing connection from {}: it sent a PROXY header but is not in "
                "proxy_protocol.trusted_networks",
                self.peer_address,
            )
            raise SessionEnd("rejected: PROXY header from an untrusted address")

    def check_no_pending(self, reader: Any, what: str) -> None:
        """Fail when the upstream sent bytes after its STARTTLS/STLS reply."""
        assert self.upstream is not None
        if reader.buffered_size or self.upstream.buffered:
            raise UpstreamError(
                "starttls", f"server sent data after its {what} reply, before the handshake"
            )

    async def _reject_over_limit(self) -> None:
        self.outcome = "rejected: listener at max_connections"
        self.log.warning("rejecting client: listener is at max_connections")
        if self.env.listener.tls == "implicit":
            try:
                async with asyncio.timeout(5):
                    await self._client_handshake()
            except (TimeoutError, SessionEnd):
                return
        self._say_goodbye("busy")

    def _admit_client(self) -> bool:
        """Count the session against its client address, or send the goodbye when the address is at its limit."""
        self.address_key = self.env.guard.try_open(self.client_host, self.limits)
        if self.address_key is not None:
            return True
        self.outcome = "rejected: client address at max_connections_per_address"
        self._say_goodbye("busy")
        return False

    def _release_client(self) -> None:
        if self.address_key is not None:
            self.env.guard.close(self.address_key)
            self.address_key = None

    # Login outcomes

    async def delay_login(self, login: bytes | str | None) -> None:
        """Wait the delay that authentication failures from this client address earned.

        A client that ends its stream before or during the wait has left, or at least
        sent its last command. Its login (`login` is the user name for the log) is then
        logged as cancelled and never sent upstream, its turn goes back to the guard, and
        ConnectionClosed ends the session.
        """
        turn = self.env.guard.reserve_login(self.client_host, self.limits)
        if turn.delay <= 0:
            return
        self.log.debug("delaying login by {:.1f}s after failed logins", turn.delay)
        ended = True
        try:
            ended = await self.client.wait_for_end(turn.delay)
        except asyncio.CancelledError:
            # The pre-auth timeout or a shutdown ended the wait before the login went out.
            self.record_login("cancelled", login)
            raise
        finally:
            # Also when the wait is cancelled, by the pre-auth timeout or a shutdown.
            if ended:
                self.env.guard.release_login(turn)
        if ended:
            self.log.debug(
                "client ended the connection during the failed-login delay; "
                "dropping its login"
            )
            self.record_login("cancelled", login)
            raise ConnectionClosed

    def reject_oversized_login(self, user: bytes, password: bytes) -> bool:
        """Record a login over MAX_LOGIN_USER_SIZE or MAX_LOGIN_PASSWORD_SIZE as rejected.

        Returns whether the login is over a limit. The caller then sends the rejection
        and never forwards the login. An oversized user name is left out of the log.
        """
        if len(user) <= MAX_LOGIN_USER_SIZE and len(password) <= MAX_LOGIN_PASSWORD_SIZE:
            return False
        self.log.info(
            "rejecting a login with a {}-byte user name and a {}-byte password: "
            "over the limits of {} and {} bytes",
            len(user),
            len(password),
            MAX_LOGIN_USER_SIZE,
            MAX_LOGIN_PASSWORD_SIZE,
        )
        self.record_login("rejected", user if len(user) <= MAX_LOGIN_USER_SIZE else None)
        return True

    def reject_authorization_identity(self, authzid: bytes, user: bytes) -> None:
        """Record as rejected a SASL PLAIN login that requests to act as user `authzid`.

        The appliance logs in upstream as the user only, without an authorization
        identity. It rejects such a login rather than drop `authzid`, which would log the
        client in as the user instead. No password was checked, so the failed-login delay
        stays as it is. The caller sends the reply.
        """
        self.log.debug(
            'rejecting the login: its SASL PLAIN authorization identity "{}" is not '
            "the user name, and the appliance does not log in as another user",
            escape(authzid).replace('"', "\\x22"),
        )
        self.record_login("rejected", user if len(user) <= MAX_LOGIN_USER_SIZE else None)

    def start_forwarding_login(self) -> None:
        """Mark the current login as forwarded until record_login logs its outcome.

        Protocols call it after the failed-login delay, before a routed login connects
        its upstream. The pre-auth timeout then falls no sooner than
        `limits.login_reply_timeout` from now, so the server's reply is not cut off.
        Servers delay a rejected login on purpose (Dovecot 2.3 by its auth_failure_delay,
        2 s by default), and a guess sent just before the deadline would otherwise end as
        `unavailable`, which fail2ban does not count. The timeout falls no later than
        `login_reply_timeout` after it was first due, so a client that keeps sending
        logins cannot keep its session open.
        """
        self.forwarding_login = True
        current = _pre_auth_deadline.get()
        if current is None:
            return
        deadline, first_due = current
        if deadline.expired():
            return
        when = deadline.when()
        now = asyncio.get_running_loop().time()
        grace = self.limits.login_reply_timeout
        extended = min(now + grace, first_due + grace)
        if when is not None and when < extended:
            deadline.reschedule(extended)

    def _record_unavailable_login(self) -> None:
        """Record the login that the proxy was forwarding as `unavailable`.

        The failed-login delay stays as it is, except after a routed server that could
        not be reached, which `connect_route` counts as a failure.
        """
        if self.forwarding_login:
            self.record_login("unavailable", self.user)

    def record_login(self, result: str, user: bytes | str | None = None) -> None:
        """Log an authentication outcome in the stable format, count it, and feed the delay.

        `result` is one of `guard.LOGIN_RESULTS`, which the metric counts by the same
        word. `succeeded` resets the failed-login delay of the client address, and
        `failed` makes it grow. A `rejected` login waits no delay, so it counts toward
        max_protocol_errors instead, and may raise TooManyProtocolErrors.
        """
        self.forwarding_login = False
        message = format_login_outcome(result, self.client_host, self.client_port, user)
        self.log.info("{}", message)
        metrics.record_login(self, result)
        if result in ("succeeded", "failed"):
            succeeded = result == "succeeded"
            self.env.guard.record_login(self.client_host, self.limits, succeeded=succeeded)
        elif result == "rejected":
            self.count_client_error("login rejected")

    def count_client_error(self, message: str) -> None:
        """Count an invalid command or a rejected login toward max_protocol_errors.

        Raises TooManyProtocolErrors with `message` for the error that reaches the
        limit. The session then closes with the "protocol" goodbye in place of a reply.
        """
        self.errors += 1
        if self.errors >= self.limits.max_protocol_errors:
            raise TooManyProtocolErrors(message)

    async def _client_handshake(self, *, implicit: bool = True) -> None:
        """Run the server side of the client's TLS handshake.

        `implicit` is False after STARTTLS/STLS, where the client has spoken plain text
        already, so plain text instead of a handshake is no sign of a wrong port.
        """
        context = self.env.snapshot.contexts.listeners[self.env.listener_name]
        try:
            await self.client.start_tls(
                context, server_side=True, handshake_timeout=self.limits.pre_auth_timeout
            )
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", None)
            if implicit and reason in PLAINTEXT_HANDSHAKE_REASONS:
                self.warn_client_setup(
                    "plaintext_on_tls_port",
                    "closing connection from {}: it sent data that is not a TLS "
                    "handshake ({}), likely plain IMAP or POP3, to an implicit TLS port. "
                    "Set the client to use TLS (SSL/TLS, not STARTTLS) on this port, or "
                    "connect it to a STARTTLS or plain-text listener",
                    self.peer_address,
                    reason,
                )
            raise SessionEnd(f"client {describe_tls_error(exc, 'client')}") from None

    async def start_client_tls(self) -> None:
        """Upgrade the client side after STARTTLS/STLS; pipelined plaintext is discarded."""
        await self._client_handshake(implicit=False)

    def warn_client_setup(self, kind: str, message: str, *args: Any) -> None:
        """Log a warning about a client set up for another kind of port.

        One such warning per listener and `kind` goes out each
        CLIENT_SETUP_WARNING_INTERVAL seconds, with the count of repeats since the last
        one. The repeats are logged at DEBUG.
        """
        key = (self.env.listener_name, kind)
        self.warn_limited(CLIENT_SETUP_WARNINGS, key, message, *args)

    def warn_limited(
        self, limiter: RepeatLimiter, key: Hashable, message: str, *args: Any
    ) -> None:
        """Log a warning that `limiter` allows for `key`, or else log it at DEBUG.

        An allowed warning ends with the count of repeats held back since the last one.
        """
        held_back = limiter.allow(key)
        if held_back is None:
            self.log.debug(message, *args)
            return
        if held_back:
            message += f" ({held_back} more since the last such warning, at DEBUG)"
        self.log.warning(message, *args)

    async def _relay(self) -> None:
        assert self.upstream is not None
        self.phase = "relay"
        if self.upstream_target is not None:
            remember_tls_session(self.upstream, self.upstream_target)
        join(self.client, self.upstream)
        # An idle session then keeps no parser, greeting or capability list.
        for name in self.pre_auth_state:
            setattr(self, name, None)
        idle = IdleTimer(self, self.limits.idle_timeout)
        try:
            await first_closed(self.client, self.upstream)
        finally:
            idle.cancel()
        if self.outcome == "closed":
            self.outcome = relay_outcome(self.client, self.upstream)

    # Ending

    def shutdown(self, *, final: bool) -> None:
        """Close for shutdown: a goodbye before login, a plain close in the relay."""
        if self.phase == "pre-auth":
            self.outcome = "shut down before login"
            self._say_goodbye("shutdown")
            if self.task is not None:
                self.task.cancel()
        elif final:
            self.outcome = "shut down in relay"
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()

    def _say_goodbye(self, kind: str) -> None:
        if self.phase != "pre-auth":
            return
        self.phase = "closing"
        try:
            self.client.send(self.goodbye(kind))
        except (ConnectionError, RuntimeError):
            pass

    async def _close(self) -> None:
        self.phase = "closing"
        connections = [c for c in (self.client, self.upstream) if c is not None]
        await close_flushed(connections)

    def _upstream_label(self) -> str:
        target = self.upstream_target
        if target is not None:
            return f"{target.name} ({target.address}, {target.mode})"
        if not self.routes_by_login:
            return self.env.listener.upstream or "?"
        return self.dropped_upstream or "none (no login was routed)"

    def _log_summary(self) -> None:
        client_tls = self.client.tls_info
        upstream_tls = self.upstream.tls_info if self.upstream is not None else None
        self.log.info(
            "session ended: {} after {:.3f}s; client {}; upstream {}; client tls {}; "
            "upstream tls {}; bytes from client {}, to client {}",
            self.outcome,
            time.monotonic() - self.started,
            self.client_address,
            self._upstream_label(),
            _format_tls(client_tls),
            _format_tls(upstream_tls),
            self.client.bytes_received,
            self.client.bytes_sent,
        )


async def _next_event(reader: Any, connection: Connection) -> Any:
    while True:
        event = reader.next_event()
        if event is not None:
            return event
        data = await connection.read_some()
        if not data:
            raise ConnectionClosed
        reader.feed(data)


def _format_tls(info: tuple[str, str] | None) -> str:
    return "none" if info is None else f"{info[0]} {info[1]}"
