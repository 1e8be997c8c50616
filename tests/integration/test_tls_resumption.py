"""Upstream TLS sessions are resumed against real Dovecot, on asyncio and on uvloop.

The tests open upstream connections the way a session does (`open_upstream`, and
`upgrade_upstream` after STARTTLS) with the context built from an upstream's config, and
read `session_reused` from the TLS object of the second connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from appliance.config.models import UpstreamConfig
from appliance.proxy.connection import Connection
from appliance.proxy.upstream import (
    UpstreamTarget,
    open_upstream,
    remember_tls_session,
    upgrade_upstream,
)
from appliance.tls.contexts import UpstreamContext, client_context
from tests.support.loops import LOOPS, run_on_loop

TIMEOUT = 20.0


def run(loop_name: str, scenario: Callable[[], Awaitable[None]]) -> None:
    run_on_loop(loop_name, scenario, TIMEOUT * 3)


def context_for(dovecot, **options) -> UpstreamContext:
    options.setdefault("session_resumption", True)
    config = UpstreamConfig(host="localhost", ca_file=dovecot.ca_file, **options)
    return client_context(config, "upstreams.test")


async def read_line(connection: Connection) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = await connection.read_some()
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


async def implicit_session(dovecot, context: UpstreamContext) -> bool:
    """Connect to the IMAPS port, read the greeting, keep the session; was it resumed?"""
    target = UpstreamTarget(
        "test", "127.0.0.1", dovecot.ports["imaps"], "implicit", context, "localhost"
    )
    connection = await open_upstream(target, TIMEOUT)
    try:
        greeting = await read_line(connection)
        assert greeting.startswith(b"* OK")
        remember_tls_session(connection, target)
        return connection.extra("ssl_object").session_reused
    finally:
        connection.abort()


async def starttls_session(dovecot, context: UpstreamContext) -> bool:
    """Connect to the IMAP port, upgrade with STARTTLS, keep the session; was it resumed?"""
    target = UpstreamTarget(
        "test", "127.0.0.1", dovecot.ports["imap"], "starttls", context, "localhost"
    )
    connection = await open_upstream(target, TIMEOUT)
    try:
        await read_line(connection)
        connection.send(b"a STARTTLS\r\n")
        assert (await read_line(connection)).startswith(b"a OK")
        await upgrade_upstream(connection, target, TIMEOUT)
        connection.send(b"b NOOP\r\n")
        assert b"b OK" in await read_line(connection)
        remember_tls_session(connection, target)
        return connection.extra("ssl_object").session_reused
    finally:
        connection.abort()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_second_implicit_connection_resumes(loop_name, dovecot) -> None:
    context = context_for(dovecot, tls="implicit")
    results: list[bool] = []

    async def scenario() -> None:
        for _ in range(3):
            results.append(await implicit_session(dovecot, context))

    run(loop_name, scenario)

    assert results == [False, True, True]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_starttls_connection_resumes(loop_name, dovecot) -> None:
    context = context_for(dovecot, tls="starttls")
    results: list[bool] = []

    async def scenario() -> None:
        for _ in range(2):
            results.append(await starttls_session(dovecot, context))

    run(loop_name, scenario)

    assert results == [False, True]


def test_resumption_can_be_switched_off(dovecot) -> None:
    context = context_for(dovecot, tls="implicit", session_resumption=False)
    results: list[bool] = []

    async def scenario() -> None:
        for _ in range(2):
            results.append(await implicit_session(dovecot, context))

    run("asyncio", scenario)

    assert results == [False, False]


def test_session_bound_to_server_name(dovecot) -> None:
    context = context_for(dovecot, tls="implicit")
    results: list[bool] = []

    async def scenario() -> None:
        results.append(await implicit_session(dovecot, context))
        # Same server, another name: the session verified for "localhost" is not used.
        other = UpstreamTarget(
            "test", "127.0.0.1", dovecot.ports["imaps"], "implicit", context, "127.0.0.1"
        )
        connection = await open_upstream(other, TIMEOUT)
        try:
            await read_line(connection)
            results.append(connection.extra("ssl_object").session_reused)
        finally:
            connection.abort()

    run("asyncio", scenario)

    assert results == [False, False]


def test_each_session_is_offered_once(dovecot) -> None:
    context = context_for(dovecot, tls="implicit")
    counts: list[int] = []
    reused: list[bool] = []

    async def scenario() -> None:
        await implicit_session(dovecot, context)
        counts.append(context.session_count("localhost"))
        target = UpstreamTarget(
            "test", "127.0.0.1", dovecot.ports["imaps"], "implicit", context, "localhost"
        )
        # Two connections at once: only the first gets the one stored session.
        first = await open_upstream(target, TIMEOUT)
        second = await open_upstream(target, TIMEOUT)
        try:
            for connection in (first, second):
                await read_line(connection)
                reused.append(connection.extra("ssl_object").session_reused)
        finally:
            first.abort()
            second.abort()
        counts.append(context.session_count("localhost"))

    run("asyncio", scenario)

    assert counts == [1, 0]
    assert reused == [True, False]
