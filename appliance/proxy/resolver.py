"""Upstream host names resolved once for many sessions.

asyncio resolves a host name with getaddrinfo in a worker thread on every connect. For a
proxy that connects once per login, that is a thread hand-off and a resolver call per
session: 0.1 to 0.3 ms of CPU per sequential session here for `localhost`, and a DNS
round trip for a remote name. `Resolver` keeps each result for `RESOLVE_TTL` seconds and
shares one lookup among sessions that start together. It drops a result as soon as a
connect to its addresses fails, so a moved server is found again at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

# Seconds a result is reused. getaddrinfo does not report the DNS record's TTL, so this
# bounds how long a changed record goes unseen while connects still succeed.
RESOLVE_TTL = 30.0
# Results kept at most; expired ones are dropped first when the cache is full.
MAX_RESULTS = 1024


def is_address(host: str) -> bool:
    """Return whether `host` is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


class Resolver:
    """Addresses of upstream hosts, cached for a bounded time."""

    def __init__(
        self,
        ttl: float = RESOLVE_TTL,
        clock: Callable[[], float] = time.monotonic,
        getaddrinfo: Callable[..., Awaitable[list[Any]]] | None = None,
    ) -> None:
        """`getaddrinfo` replaces the running loop's, for tests."""
        self.ttl = ttl
        self.clock = clock
        self._getaddrinfo = getaddrinfo
        self._results: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Future[list[str]]] = {}

    async def addresses(self, host: str, port: int) -> list[str]:
        """Return the addresses to try for `host`, in getaddrinfo's order."""
        if is_address(host):
            return [host]
        key = (host, port)
        result = self._results.get(key)
        if result is not None and result[0] > self.clock():
            return result[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(host, port))
            self._lookups[key] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(key, done))
        # A session that times out must not cancel the lookup that others wait for.
        return await asyncio.shield(lookup)

    def _lookup_done(self, key: tuple[str, int], lookup: asyncio.Future[list[str]]) -> None:
        self._lookups.pop(key, None)
        if not lookup.cancelled():
            # Marks a failure as seen: the waiters get it through their shields, and
            # without one left asyncio would log it as never retrieved.
            lookup.exception()

    def forget(self, host: str, port: int) -> None:
        """Drop the result for `host`, so that the next connect resolves it again."""
        self._results.pop((host, port), None)

    async def _look_up(self, host: str, port: int) -> list[str]:
        getaddrinfo = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        infos = await getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if len(self._results) >= MAX_RESULTS:
            self._drop_expired()
        self._results[(host, port)] = (self.clock() + self.ttl, addresses)
        return addresses

    def _drop_expired(self) -> None:
        now = self.clock()
        for key, (expires, _) in list(self._results.items()):
            if expires <= now:
                del self._results[key]
        if len(self._results) >= MAX_RESULTS:
            self._results.clear()


RESOLVER = Resolver()
