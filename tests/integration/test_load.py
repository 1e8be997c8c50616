"""2,000 concurrent sessions through the real appliance to Dovecot, some of them hostile.

The client side runs in this process on asyncio. Most sessions sit idle before login,
some misbehave (random bytes, one byte a second, oversize literals), and the rest log in
as their own user, select INBOX and fetch a message while all the others stay open. The
appliance must serve every good session, and once all sessions close its resident memory
(VmRSS of /proc/PID/status) must come back near its earlier level.

The earlier level is measured after two loads of the same size. CPython's small-object
allocator keeps an arena for as long as one object in it lives, so the first burst
raises the resident size for good. In local runs it went from about 56 MiB to about
72 MiB after a peak near 79 MiB; in one CI run the second burst left 4 MiB more. A
later burst that does not come back to that level leaks.

Dovecot's defaults (100 login processes, 10 connections per user and address) would
refuse this load, so its fixture gets a higher connection limit and one user per good
session.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.appliance import ApplianceProcess, dovecot_config
from tests.support.dovecot import DovecotServer, numbered_users

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Mix:
    """How many sessions of each kind one load run opens."""

    idle: int
    garbage: int
    slowloris: int
    literal: int
    good: int

    @property
    def total(self) -> int:
        return self.idle + self.garbage + self.slowloris + self.literal + self.good


LOAD = Mix(idle=1300, garbage=100, slowloris=100, literal=100, good=400)
# Every kind of session once at a small scale, so that first-use allocations, such as
# caches and metric series, happen before the baseline is measured.
WARMUP = Mix(idle=20, garbage=10, slowloris=10, literal=10, good=20)
TOTAL_SESSIONS = LOAD.total
# Each session uses a client socket here, and two sockets in the appliance.
FILES_NEEDED = 2 * TOTAL_SESSIONS + 1000
CONNECT_BATCH = 200
STEP_TIMEOUT = 60.0
SETTLE_TIMEOUT = 30.0
MiB = 1024 * 1024
MEMORY_SLACK = 4 * MiB

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def open_files_limit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FILES_NEEDED:
        pytest.skip(f"open files hard limit {hard} is below the {FILES_NEEDED} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FILES_NEEDED), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def mail_server(dovecot_factory) -> DovecotServer:
    return dovecot_factory(
        fresh=True,
        tls="none",
        connection_limit=TOTAL_SESSIONS + 500,
        extra_users=numbered_users(LOAD.good),
    )


@pytest.fixture(scope="module")
def proxy(mail_server, tmp_path_factory) -> Iterator[ApplianceProcess]:
    limits = {
        "max_connections": TOTAL_SESSIONS + 100,
        "max_connections_per_address": TOTAL_SESSIONS + 100,
        "pre_auth_timeout": 90,
    }
    listeners = {"imap": ("imap", "none", "none")}
    config = dovecot_config(mail_server, listeners, limits=limits)
    with ApplianceProcess(config, tmp_path_factory.mktemp("load")) as process:
        yield process


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS line in /proc/{pid}/status")


# Clients


@dataclass
class Load:
    """Open client streams and the outcome of each good session."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    good_results: list[bool] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def open_client(
    port: int, load: Load
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port), STEP_TIMEOUT
    )
    load.writers.append(writer)
    greeting = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
    assert greeting.startswith(b"* OK"), greeting
    return reader, writer


async def read_tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    """Read through the reply tagged `tag`, literals included, and return it."""
    while True:
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        if not line:
            raise ConnectionError(f"closed before the reply tagged {tag!r}")
        if line.endswith(b"}\r\n") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1 : -3])
            await asyncio.wait_for(reader.readexactly(size), STEP_TIMEOUT)
        if line.startswith(tag + b" "):
            return line


async def good_session(port: int, user: str, password: str, load: Load) -> bool:
    """Log in, select INBOX, fetch the first message and keep the session open."""
    reader, writer = await open_client(port, load)
    writer.write(f'g1 LOGIN {user} "{password}"\r\n'.encode())
    if not (await read_tagged(reader, b"g1")).startswith(b"g1 OK"):
        return False
    writer.write(b"g2 SELECT INBOX\r\n")
    if not (await read_tagged(reader, b"g2")).startswith(b"g2 OK"):
        return False
    writer.write(b"g3 FETCH 1 BODY.PEEK[]\r\n")
    return (await read_tagged(reader, b"g3")).startswith(b"g3 OK")


async def garbage_session(port: int, rng: random.Random, load: Load) -> None:
    """Send random lines until the appliance closes the session for too many errors."""
    reader, writer = await open_client(port, load)
    try:
        for _ in range(50):
            writer.write(rng.randbytes(rng.randrange(1, 200)) + b"\r\n")
            if not await asyncio.wait_for(reader.read(4096), STEP_TIMEOUT):
                return
    except (ConnectionResetError, BrokenPipeError):
        # Lines sent after the appliance closed the session make its kernel reset.
        return
    raise AssertionError("appliance kept a session open after 50 random lines")


async def slowloris_session(port: int, load: Load) -> None:
    """Send one byte a second of a line that never ends."""
    _, writer = await open_client(port, load)
    while not load.stop.is_set():
        writer.write(b"x")
        try:
            await asyncio.wait_for(load.stop.wait(), 1.0)
        except TimeoutError:
            pass


async def literal_session(port: int, number: int, load: Load) -> None:
    """Announce a literal far above the limit, with and without LITERAL+."""
    reader, writer = await open_client(port, load)
    plus = b"+" if number % 2 else b""
    writer.write(b"l1 LOGIN {4000000000" + plus + b"}\r\n" + b"x" * 1024)
    reply = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
    # With LITERAL+ the BAD is followed by BYE: the literal's bytes cannot be skipped.
    assert reply.startswith(b"l1 BAD literal too large"), reply


async def in_batches(coroutines: list[Any]) -> list[Any]:
    results = []
    for start in range(0, len(coroutines), CONNECT_BATCH):
        results += await asyncio.gather(*coroutines[start : start + CONNECT_BATCH])
    return results


async def run_load(
    port: int, mix: Mix, users: list[tuple[str, str]], pid: int
) -> dict[str, Any]:
    """Open `mix` concurrently, wait for the good sessions, then close everything."""
    load = Load()
    rng = random.Random(2000)
    hostile = [literal_session(port, n, load) for n in range(mix.literal)]
    hostile += [garbage_session(port, rng, load) for _ in range(mix.garbage)]
    await in_batches([open_client(port, load) for _ in range(mix.idle)])
    await in_batches(hostile)
    slowloris = [
        asyncio.create_task(slowloris_session(port, load)) for _ in range(mix.slowloris)
    ]
    started = time.monotonic()
    good = [
        good_session(port, user, password, load) for user, password in users[: mix.good]
    ]
    load.good_results = await asyncio.gather(*good)
    elapsed = time.monotonic() - started
    peak = resident_bytes(pid)
    load.stop.set()
    await asyncio.gather(*slowloris)
    for writer in load.writers:
        writer.close()
    await asyncio.gather(
        *(w.wait_closed() for w in load.writers), return_exceptions=True
    )
    return {"good": load.good_results, "elapsed": elapsed, "peak": peak}


def wait_for_sessions_closed(proxy: ApplianceProcess, sessions: int) -> None:
    """Wait until the log has at least `sessions` session end lines in all."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        ended = proxy.log_text().count("session ended")
        if ended >= sessions:
            return
        assert time.monotonic() < deadline, f"{sessions - ended} sessions still open"
        time.sleep(0.2)


def stable_resident_bytes(pid: int) -> int:
    """Return VmRSS once it changed by less than 256 KiB in 3 s, or after a while.

    The appliance gives memory back a few seconds after a burst of sessions ends.
    """
    readings = [resident_bytes(pid)]
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.5)
        readings.append(resident_bytes(pid))
        recent = readings[-7:]
        if len(recent) == 7 and max(recent) - min(recent) < 256 * 1024:
            break
    return readings[-1]


def settled_resident_bytes(pid: int, target: int) -> int:
    """Return VmRSS as soon as it is at most `target`, else its value after a while."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (resident := resident_bytes(pid)) > target and time.monotonic() < deadline:
        time.sleep(0.5)
    return resident


def run_and_close(proxy: ApplianceProcess, mix: Mix, users: list[tuple[str, str]]):
    """Run one load of `mix` and wait until the appliance ended all its sessions."""
    assert proxy.process is not None
    ended_before = proxy.log_text().count("session ended")
    outcome = asyncio.run(run_load(proxy.port("imap"), mix, users, proxy.process.pid))
    # Every connection of the load is a session, rejected ones included.
    wait_for_sessions_closed(proxy, ended_before + mix.total)
    return outcome


def test_load_serves_good_sessions_and_frees_memory(proxy):
    assert proxy.process is not None
    pid = proxy.process.pid
    users = list(numbered_users(LOAD.good).items())
    run_and_close(proxy, WARMUP, users)
    first = run_and_close(proxy, LOAD, users)
    # A second full load before the baseline: a CI run once ended 40 KiB over the bound
    # after only one, because heap fragmentation still grew a little in the second load.
    run_and_close(proxy, LOAD, users)
    baseline = stable_resident_bytes(pid)

    second = run_and_close(proxy, LOAD, users)
    growth = second["peak"] - baseline
    allowed = baseline + max(growth // 4, MEMORY_SLACK)
    after = settled_resident_bytes(pid, allowed)
    last = run_and_close(proxy, WARMUP, users)

    assert sum(first["good"]) == LOAD.good
    assert sum(second["good"]) == LOAD.good
    assert all(last["good"])
    assert after <= allowed, (
        f"RSS {after / MiB:.1f} MiB after the load; baseline {baseline / MiB:.1f} MiB, "
        f"peak {second['peak'] / MiB:.1f} MiB, allowed {allowed / MiB:.1f} MiB"
    )
