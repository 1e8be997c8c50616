"""Upstream host names resolved once for many sessions.

asyncio resolves a host name with getaddrinfo in a worker thread on every connect. For a
proxy that connects once per login, that is a thread hand-off and a resolver call per
session: 0.1 to 0.3 ms of CPU per sequential session here for `localhost`, and a DNS
round trip for a remote name. `Resolver` keeps each result for `RESOLVE_TTL` seconds and
shares one lookup among sessions that start together. It drops a result as soon as a
connect to its addresses fails, and all results when a reload is accepted, so a moved
server is found again at once.
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
# Host names kept at most. Routing by login can reach many names, so the oldest results
# make room for new ones.
MAX_RESULTS = 1024


def is_address(host: str) -> bool:
    """Return whether `host` is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


class Resolver:
    """Addresses of upstream host names, cached for a bounded time."""

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
        self._results: dict[str, tuple[float, list[str]]] = {}
        # A lookup belongs to the loop that runs it, so another loop starts its own.
        self._lookups: dict[str, asyncio.Future[list[str]]] = {}
        # Increased by forget() and clear(), so that a lookup started before them does
        # not store its result afterwards.
        self._generation = 0

    async def addresses(self, host: str) -> list[str]:
        """Return the addresses to try for `host`, in getaddrinfo's order."""
        if is_address(host):
            return [host]
        result = self._results.get(host)
        if result is not None and result[0] > self.clock():
            return result[1]
        lookup = self._lookups.get(host)
        if lookup is None or lookup.get_loop() is not asyncio.get_running_loop():
            lookup = asyncio.ensure_future(self._look_up(host, self._generation))
            self._lookups[host] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(host, done))
        # A session that times out must not cancel the lookup that others wait for.
        return await asyncio.shield(lookup)

    def forget(self, host: str) -> None:
        """Drop the result for `host`, so that the next connect resolves it again."""
        self._results.pop(host, None)
        self._lookups.pop(host, None)
        self._generation += 1

    def clear(self) -> None:
        """Drop every result, for a reload after which DNS may have been fixed."""
        self._results.clear()
        self._lookups.clear()
        self._generation += 1

    def _lookup_done(self, host: str, lookup: asyncio.Future[list[str]]) -> None:
        if self._lookups.get(host) is lookup:
            del self._lookups[host]
        if not lookup.cancelled():
            # Marks a failure as seen: the waiters get it through their shields, and
            # without one left asyncio would log it as never retrieved.
            lookup.exception()

    async def _look_up(self, host: str, generation: int) -> list[str]:
        getaddrinfo = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        infos = await getaddrinfo(
            host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = list(dict.fromkeys(_address_text(info[4]) for info in infos))
        if generation != self._generation:
            # Its waiters still get the addresses, but new sessions look up afresh.
            return addresses
        self._results.pop(host, None)
        while len(self._results) >= MAX_RESULTS:
            del self._results[next(iter(self._results))]
        self._results[host] = (self.clock() + self.ttl, addresses)
        return addresses


def _address_text(sockaddr: tuple[Any, ...]) -> str:
    """Return the address of a getaddrinfo sockaddr, with its IPv6 scope if it has one."""
    address = str(sockaddr[0])
    if len(sockaddr) == 4 and sockaddr[3]:
        return f"{address}%{sockaddr[3]}"
    return address


RESOLVER = Resolver()
