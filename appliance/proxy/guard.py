"""What one client address may cost, over all listeners: sessions and login attempts.

`ClientGuard` counts the open sessions of each client address and the authentication
failures that it caused. Failures earn a delay before the next login from that address:
`auth_failure_delay` after the first, doubling with each further one up to
`auth_failure_delay_max`, until a success resets it. An IPv6 address counts together
with the rest of its prefix (`ipv6_prefix_length`), because one host usually gets a
whole /64.

Every authentication outcome is logged in one format, so that fail2ban and similar tools
can match it:

    login failed: client 192.0.2.7 port 50124 user "alice"

The result word is `succeeded`, `failed` (the upstream rejected the credentials),
`rejected` (the appliance refused to forward them), `cancelled` (the client sent `*`,
or left while its login waited out the delay, or the pre-auth timeout or a shutdown
ended that wait), `invalid` (a malformed SASL response) or `unavailable` (no verdict
on the credentials). A login is unavailable when the upstream closed, failed or did
not reply in time while the login was forwarded, or the appliance shut down or failed
meanwhile. It is also unavailable when a routed server could not be reached, or when
the server rejected it with a response code that blames the server, such as
UNAVAILABLE. Of these words only `failed` feeds the delay, but
`Session.connect_route` also counts a routed server that could not be reached as a
failure. The client
address comes before any text that the client chose, and the user name is escaped,
so no user name can move the address or start a new line.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import ipaddress
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from appliance.config import Limits
from appliance.logs import escape

LOGIN_RESULTS = (
    "succeeded",
    "failed",
    "rejected",
    "cancelled",
    "invalid",
    "unavailable",
)
# Addresses whose failures are remembered; the oldest is dropped beyond this, so an
# attacker who rotates addresses costs bounded memory. Open sessions are counted apart
# and bounded by the listeners' max_connections.
MAX_FAILURE_RECORDS = 65536
# Doubling stops here; 2**32 seconds is far above any configured maximum.
_MAX_DOUBLINGS = 32
# Memory is released once the open sessions fall to half their peak, and only when at
# least this many sessions ended, so a small idle appliance never pays for it.
RELEASE_MIN_ENDED = 64
# Seconds from the trigger to the release, so that a burst of closes finishes first,
# and the least time between two releases, because gc.collect() blocks the event loop.
RELEASE_DELAY = 2.0
RELEASE_MIN_INTERVAL = 10.0


def address_key(host: str, ipv6_prefix_length: int) -> str:
    """Return the key under which a client address is counted.

    IPv4 addresses, also when mapped into IPv6, are their own key. IPv6 addresses are
    cut to their prefix. Anything else, such as a Unix socket path, is used as it is.
    """
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, ipv6_prefix_length), strict=False)
        return str(network)
    return str(address)


@dataclass
class _Failures:
    count: int
    last: float
    # Reserved start times of logins from the address, on the guard's clock. Those in the
    # past are dropped at the next reservation. A new login starts one delay after the
    # latest, so that parallel logins wait in turn instead of all at once.
    turns: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LoginTurn:
    """The start that `ClientGuard.reserve_login` reserved for one login."""

    key: str
    start: float
    """Time on the guard's clock when the login may start."""
    delay: float
    """Seconds from the reservation to the start; 0 when the login need not wait."""


class ClientGuard:
    """Open sessions and authentication failures per client address.

    One guard serves every listener of a process. Each method takes the limits of the
    calling session, so a reload applies to the sessions that start after it.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_failure_records: int = MAX_FAILURE_RECORDS,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._max_failure_records = max_failure_records
        # Called when the open sessions fell to half their peak after a burst.
        self._on_drained = on_drained
        self._open: dict[str, int] = {}
        self._open_total = 0
        self._peak_total = 0
        # Ordered by the time of the last failure, oldest first, for expiry.
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    # Sessions

    def try_open(self, host: str, limits: Limits) -> str | None:
        """Count a new session from `host` and return its key for `close`.

        Returns None, and counts nothing, when the address is at
        `max_connections_per_address` already.
        """
        key = address_key(host, limits.ipv6_prefix_length)
        count = self._open.get(key, 0)
        if count >= limits.max_connections_per_address:
            return None
        self._open[key] = count + 1
        self._open_total += 1
        self._peak_total = max(self._peak_total, self._open_total)
        return key

    def close(self, key: str) -> None:
        """Forget one session that `try_open` counted under `key`."""
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
        self._open_total = max(self._open_total - 1, 0)
        drained = self._peak_total - self._open_total >= RELEASE_MIN_ENDED
        if drained and self._open_total <= self._peak_total // 2:
            self._peak_total = self._open_total
            if self._on_drained is not None:
                self._on_drained()

    def open_sessions(self, host: str, limits: Limits) -> int:
        return self._open.get(address_key(host, limits.ipv6_prefix_length), 0)

    # Logins

    def reserve_login(self, host: str, limits: Limits) -> LoginTurn:
        """Reserve the start of a login from `host` and return it.

        After a failure, logins from the address start at least the current delay apart.
        A client that opens many connections at once therefore waits in turn, one delay
        after another, instead of trying many passwords per delay. A login that will not
        happen gives its turn back with `release_login`.
        """
        self._expire(limits)
        key = address_key(host, limits.ipv6_prefix_length)
        now = self._clock()
        record = self._failures.get(key)
        if record is None or limits.auth_failure_delay == 0:
            return LoginTurn(key, now, 0.0)
        doublings = min(record.count - 1, _MAX_DOUBLINGS)
        delay = limits.auth_failure_delay * 2**doublings
        delay = min(delay, limits.auth_failure_delay_max)
        # A turn that has started holds back no login beyond now + delay.
        record.turns = [start for start in record.turns if start > now]
        start = max([now, *record.turns]) + delay
        record.turns.append(start)
        return LoginTurn(key, start, start - now)

    def login_delay(self, host: str, limits: Limits) -> float:
        """Reserve the turn of a login from `host` and return its seconds to wait."""
        return self.reserve_login(host, limits).delay

    def release_login(self, turn: LoginTurn) -> None:
        """Give back a turn whose login will not happen, such as one whose client left.

        Logins reserved later keep their starts, but the next one starts one delay
        after the latest turn still held, so turns that clients gave back do not pile up.
        """
        record = self._failures.get(turn.key)
        if record is not None and turn.start in record.turns:
            record.turns.remove(turn.start)

    def record_login(self, host: str, limits: Limits, *, succeeded: bool) -> None:
        """Count an authentication failure from `host`, or reset it after a success."""
        key = address_key(host, limits.ipv6_prefix_length)
        if succeeded:
            self._failures.pop(key, None)
            return
        record = self._failures.pop(key, None) or _Failures(0, 0.0)
        record.count = min(record.count + 1, _MAX_DOUBLINGS + 1)
        record.last = self._clock()
        self._failures[key] = record
        while len(self._failures) > self._max_failure_records:
            self._failures.popitem(last=False)
        self._expire(limits)

    @property
    def failure_records(self) -> int:
        return len(self._failures)

    def _expire(self, limits: Limits) -> None:
        deadline = self._clock() - limits.auth_failure_reset_after
        while self._failures:
            key, record = next(iter(self._failures.items()))
            if record.last > deadline:
                return
            del self._failures[key]


class MemoryReleaser:
    """Give heap memory back to the kernel after a burst of sessions has ended.

    CPython frees objects into its own and the C library's free lists, which keep the
    pages, so without this the resident size of the process stays at its peak. A
    release runs a full garbage collection and then glibc's malloc_trim(), which is
    missing on other C libraries, such as musl, where only the collection runs.

    NOTE: pages that still contain one live object stay resident. In local runs of
    2,000 sessions the release took the process from 79 MiB back to 72 MiB, not to
    the 56 MiB before the burst; with PYTHONMALLOC=malloc it went from 81 to 66 MiB.
    """

    def __init__(self) -> None:
        self._pending: asyncio.TimerHandle | None = None
        self._last = float("-inf")
        self._trim = _find_malloc_trim()

    def request(self) -> None:
        """Schedule one release soon, unless one is pending already."""
        if self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        wait = max(RELEASE_DELAY, self._last + RELEASE_MIN_INTERVAL - loop.time())
        self._pending = loop.call_later(wait, self.release)

    def release(self) -> None:
        """Collect garbage and trim the heap now."""
        self._pending = None
        started = time.monotonic()
        collected = gc.collect()
        trimmed = bool(self._trim()) if self._trim is not None else False
        self._last = asyncio.get_running_loop().time()
        logger.debug(
            "released memory after sessions ended: {} objects collected, heap trimmed: "
            "{}, {:.0f} ms",
            collected,
            trimmed,
            (time.monotonic() - started) * 1000,
        )

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def _find_malloc_trim() -> Callable[[], int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        trim = ctypes.CDLL(path).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def format_login_outcome(
    result: str, host: str, port: int | str, user: bytes | str | None
) -> str:
    """Return the log message of one authentication outcome, in the stable format.

    The user name is escaped, and its double quotes become `\\x22`, so it always ends
    at the closing quote.
    """
    if result not in LOGIN_RESULTS:
        raise ValueError(f"invalid login result {result!r}; expected {LOGIN_RESULTS}")
    name = escape(user or "").replace('"', "\\x22")
    return f'login {result}: client {host} port {port} user "{name}"'


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit, log both, return them.

    Each session uses two sockets, so the common soft limit of 1024 would cap a
    process near 500 sessions.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning(
                "could not raise the open files limit from {} to {}: {}",
                soft,
                hard,
                exc,
            )
            return soft, hard
        logger.info("open files limit raised from {} to the hard limit {}", soft, hard)
        return hard, hard
    logger.info("open files limit: soft {}, hard {}", soft, _format_limit(hard))
    return soft, hard


def _format_limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
