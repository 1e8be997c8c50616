"""The session's relay phase: the wait for either side to close, the idle bound, and
the name of the side that ended it.

`connection.join` moves the bytes, and this module watches the joined pair for the session.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from appliance.proxy.connection import Connection

if TYPE_CHECKING:
    from appliance.proxy.session import Session


def relay_outcome(client: Connection, upstream: Connection) -> str:
    """Name the side that ended the relay first.

    The relay does not parse LOGOUT or QUIT. A server closes by itself after either,
    so a logout ends as "closed by upstream", and a client that drops the connection
    ends as "closed by client". Ends at the same time count as the upstream's: a client
    that closes as soon as it reads the LOGOUT reply races the server's own close. A
    relay that the half-close bound closed, because the upstream stayed silent after
    the client's end of stream, ends as "half-close timeout".
    """
    if client.half_close_expired:
        return "half-close timeout"
    if client.remote_end is None and upstream.remote_end is None:
        return "closed"
    if upstream.remote_end is None:
        return "closed by client"
    if client.remote_end is None or upstream.remote_end <= client.remote_end:
        return "closed by upstream"
    return "closed by client"


async def first_closed(*connections: Connection) -> None:
    """Wait until one of the connections is closed.

    One future and one callback per connection: asyncio.wait would hold a set, a
    waiter and a counter for every idle session.
    """
    ended = asyncio.get_running_loop().create_future()

    def set_ended(_: asyncio.Future[None]) -> None:
        if not ended.done():
            ended.set_result(None)

    for connection in connections:
        connection.closed.add_done_callback(set_ended)
    try:
        await ended
    finally:
        for connection in connections:
            connection.closed.remove_done_callback(set_ended)


class IdleTimer:
    """Close an authenticated session after `timeout` seconds without traffic either way.

    One timer per session, re-armed only when it fires, so traffic costs no timer work.
    """

    # Every idle session has one, so instances carry no __dict__.
    __slots__ = ("handle", "session", "timeout")

    def __init__(self, session: Session, timeout: float) -> None:
        self.session = session
        self.timeout = timeout
        self.handle = asyncio.get_running_loop().call_later(timeout, self._check)

    def _check(self) -> None:
        session = self.session
        last = max(session.client.last_activity, session.upstream.last_activity)
        remaining = last + self.timeout - time.monotonic()
        if remaining > 0:
            self.handle = asyncio.get_running_loop().call_later(remaining, self._check)
            return
        session.outcome = "idle timeout"
        session.client.close()
        session.upstream.close()

    def cancel(self) -> None:
        self.handle.cancel()
