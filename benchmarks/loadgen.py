"""The load generator: worker processes, each an event loop driving many sessions.

Plain-text clients use non-blocking sockets with the loop's `sock_*` calls and read
bulk data with `recv_into` into one preallocated buffer, so a worker costs little CPU
per byte. TLS clients use asyncio streams. Parsing is the minimum that finds the end of
each response: tagged IMAP lines with literal skipping, and POP3 status lines and the
CRLF.CRLF terminator. Workers use uvloop where it is installed.

Every worker gets the same `start_at` and `stop_at` on the system-wide monotonic
clock, so the counts of all workers cover the same window.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any

from benchmarks.candidates import Endpoint

READ_SIZE = 1024 * 1024
SMALL_READ_SIZE = 65536
# Connections opened at once while the memory workload builds up its idle sessions.
IDLE_OPEN_CONCURRENCY = 32


class ProtocolFailure(Exception):
    """The server sent a reply the benchmark did not expect."""


def client_tls_context() -> ssl.SSLContext:
    # Clients skip verification: the candidates use test certificates, and
    # verification cost on the client side is the same for every candidate.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Wire:
    """One client connection with a line buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.sock: socket.socket | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, endpoint: Endpoint, context: ssl.SSLContext | None) -> Wire:
        wire = cls()
        if endpoint.tls:
            assert context is not None
            wire.reader, wire.writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=context, limit=READ_SIZE
            )
            sock = wire.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return wire
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await wire.loop.sock_connect(sock, (endpoint.host, endpoint.port))
        except BaseException:
            sock.close()
            raise
        wire.sock = sock
        return wire

    async def recv(self) -> bytes:
        if self.reader is not None:
            return await self.reader.read(SMALL_READ_SIZE)
        assert self.sock is not None
        return await self.loop.sock_recv(self.sock, SMALL_READ_SIZE)

    async def recv_into(self, view: memoryview) -> int:
        if self.reader is not None:
            data = await self.reader.read(len(view))
            view[: len(data)] = data
            return len(data)
        assert self.sock is not None
        return await self.loop.sock_recv_into(self.sock, view)

    async def send(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)
            await self.writer.drain()
            return
        assert self.sock is not None
        await self.loop.sock_sendall(self.sock, data)

    async def read_line(self, prefix: bytes = b"") -> bytes:
        """Return the first complete line that starts with `prefix`, skipping others."""
        while True:
            line = self._take_line(prefix)
            if line is not None:
                return line
            data = await self.recv()
            if not data:
                raise ProtocolFailure(f"connection closed while waiting for {prefix!r}")
            self.buffer += data

    def _take_line(self, prefix: bytes) -> bytes | None:
        start = 0
        while True:
            end = self.buffer.find(b"\r\n", start)
            if end < 0:
                del self.buffer[:start]
                return None
            line = bytes(self.buffer[start:end])
            start = end + 2
            if line.startswith(prefix):
                del self.buffer[:start]
                return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# Protocol steps


async def imap_login(wire: Wire, user: str, password: str) -> None:
    await wire.read_line()
    await wire.send(f"a LOGIN {user} {password}\r\n".encode())
    reply = await wire.read_line(b"a ")
    if not reply.startswith(b"a OK"):
        raise ProtocolFailure(f"LOGIN failed: {reply[:80]!r}")


async def imap_command(wire: Wire, tag: bytes, command: bytes) -> bytes:
    await wire.send(tag + b" " + command + b"\r\n")
    reply = await wire.read_line(tag + b" ")
    if not reply.startswith(tag + b" OK"):
        raise ProtocolFailure(f"{command[:20]!r} failed: {reply[:80]!r}")
    return reply


async def pop3_login(wire: Wire, user: str, password: str) -> None:
    await _pop3_ok(wire, "greeting")
    await wire.send(f"USER {user}\r\n".encode())
    await _pop3_ok(wire, "USER")
    await wire.send(f"PASS {password}\r\n".encode())
    await _pop3_ok(wire, "PASS")


async def _pop3_ok(wire: Wire, what: str) -> None:
    reply = await wire.read_line()
    if not reply.startswith(b"+OK"):
        raise ProtocolFailure(f"{what} failed: {reply[:80]!r}")


async def login(wire: Wire, protocol: str, user: str, password: str) -> None:
    if protocol == "imap":
        await imap_login(wire, user, password)
    else:
        await pop3_login(wire, user, password)


class ImapFetchReader:
    """Consume one IMAP FETCH response: skip literals, stop at the tagged line."""

    def __init__(self, tag: bytes) -> None:
        self.tagged_prefix = tag + b" "
        self.literal_left = 0
        self.partial_line = bytearray()
        self.done = False

    def feed(self, data: bytearray, size: int) -> None:
        position = 0
        while position < size and not self.done:
            if self.literal_left:
                taken = min(self.literal_left, size - position)
                self.literal_left -= taken
                position += taken
                continue
            end = data.find(b"\n", position, size)
            if end < 0:
                self.partial_line += data[position:size]
                return
            line = bytes(self.partial_line + data[position : end + 1])
            self.partial_line.clear()
            position = end + 1
            self._line(line)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"}\r\n"):
            self.literal_left = int(line[line.rindex(b"{") + 1 : -3])
        elif line.startswith(self.tagged_prefix):
            if not line.startswith(self.tagged_prefix + b"OK"):
                raise ProtocolFailure(f"FETCH failed: {line[:80]!r}")
            self.done = True


async def imap_fetch_all(
    wire: Wire, first: int, buffer: bytearray, view: memoryview, counter: list[int]
) -> None:
    """Fetch messages `first`:* once; add received bytes to counter[0]."""
    await wire.send(b"f FETCH %d:* BODY.PEEK[]\r\n" % first)
    reader = ImapFetchReader(b"f")
    while not reader.done:
        size = await wire.recv_into(view)
        if size == 0:
            raise ProtocolFailure("connection closed during FETCH")
        counter[0] += size
        reader.feed(buffer, size)


async def pop3_retr(
    wire: Wire, number: int, buffer: bytearray, view: memoryview, counter: list[int]
) -> None:
    """Retrieve one message; add received bytes to counter[0]."""
    await wire.send(b"RETR %d\r\n" % number)
    tail = b""
    first = True
    while True:
        size = await wire.recv_into(view)
        if size == 0:
            raise ProtocolFailure("connection closed during RETR")
        counter[0] += size
        if first and buffer.startswith(b"-ERR"):
            raise ProtocolFailure(f"RETR failed: {bytes(buffer[:80])!r}")
        first = False
        # Bulk messages contain no dot-led lines, so CRLF.CRLF only ends a response.
        tail = (tail + bytes(buffer[max(0, size - 5) : size]))[-5:]
        if tail == b"\r\n.\r\n":
            return


# Workloads, one coroutine per worker process


async def sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def throughput_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Drive sessions that each fetch their whole bulk mailbox again and again."""
    endpoint = Endpoint(**job["endpoint"])
    context = client_tls_context()
    counter = [0]
    failures: list[str] = []

    async def session(user: str, password: str) -> None:
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        wire = await Wire.open(endpoint, context)
        try:
            await login(wire, endpoint.protocol, user, password)
            if endpoint.protocol == "imap":
                await imap_command(wire, b"s", b"SELECT INBOX")
            await sleep_until(job["start_at"])
            while time.monotonic() < job["stop_at"]:
                if endpoint.protocol == "imap":
                    await imap_fetch_all(wire, job["first"], buffer, view, counter)
                    continue
                for number in range(job["first"], job["last"] + 1):
                    await pop3_retr(wire, number, buffer, view, counter)
                    if time.monotonic() >= job["stop_at"]:
                        break
        finally:
            wire.close()

    async def bounded(user: str, password: str) -> None:
        try:
            async with asyncio.timeout(job["stop_at"] - time.monotonic()):
                await session(user, password)
        except TimeoutError:
            pass
        except (OSError, ProtocolFailure) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    # Bytes received before start_at belong to the login, so they are subtracted.
    sessions = [bounded(user, password) for user, password in job["users"]]
    tasks = [asyncio.ensure_future(s) for s in sessions]
    await sleep_until(job["start_at"])
    at_start = counter[0]
    await asyncio.gather(*tasks)
    return {"bytes": counter[0] - at_start, "failures": failures}


async def session_rate_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Connect, log in and log out in a loop from `concurrency` coroutines."""
    endpoint = Endpoint(**job["endpoint"])
    context = client_tls_context()
    users = job["users"]
    completed = 0
    failures: list[str] = []
    start_at, stop_at = job["start_at"], job["stop_at"]

    async def one_session(user: str, password: str) -> None:
        wire = await Wire.open(endpoint, context)
        try:
            await imap_login(wire, user, password)
            await imap_command(wire, b"b", b"LOGOUT")
        finally:
            wire.close()

    async def loop(offset: int) -> None:
        nonlocal completed
        index = offset
        while time.monotonic() < stop_at:
            user, password = users[index % len(users)]
            index += job["concurrency"]
            try:
                await one_session(user, password)
            except (OSError, ProtocolFailure) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)
                continue
            if start_at <= time.monotonic() <= stop_at:
                completed += 1

    try:
        async with asyncio.timeout(stop_at - time.monotonic() + 10):
            await asyncio.gather(*(loop(i) for i in range(job["concurrency"])))
    except TimeoutError:
        failures.append("sessions still open 10 s after the window")
    return {
        "sessions": completed,
        "failures": failures[:20],
        "failure_count": len(failures),
    }


async def idle_worker(job: dict[str, Any], events: Any) -> dict[str, Any]:
    """Open sessions, SELECT INBOX, enter IDLE, report, and hold them until released."""
    endpoint = Endpoint(**job["endpoint"])
    wires: list[Wire] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(IDLE_OPEN_CONCURRENCY)

    async def open_idle(user: str, password: str) -> None:
        async with gate:
            wire = await Wire.open(endpoint, None)
            try:
                await imap_login(wire, user, password)
                await imap_command(wire, b"s", b"SELECT INBOX")
                await wire.send(b"i IDLE\r\n")
                await wire.read_line(b"+")
            except BaseException:
                wire.close()
                raise
            wires.append(wire)

    async def guarded(user: str, password: str) -> None:
        try:
            await open_idle(user, password)
        except (OSError, ProtocolFailure) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    try:
        async with asyncio.timeout(job["open_timeout"]):
            await asyncio.gather(*(guarded(u, p) for u, p in job["users"]))
    except TimeoutError:
        failures.append("timed out opening idle sessions")
    events["results"].put({"ready": len(wires)})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, events["release"].wait, job["hold_timeout"])
    for wire in wires:
        try:
            await wire.send(b"DONE\r\nz LOGOUT\r\n")
        except OSError:
            pass
        wire.close()
    return {
        "opened": len(wires),
        "failures": failures[:20],
        "failure_count": len(failures),
    }


def noop_latency(job: dict[str, Any]) -> dict[str, Any]:
    """Measure NOOP round trips through one plain session with a blocking socket."""
    endpoint = Endpoint(**job["endpoint"])
    user, password = job["users"][0]
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _BlockingLines(sock)
        reader.line(b"")
        sock.sendall(f"a LOGIN {user} {password}\r\n".encode())
        if not reader.line(b"a ").startswith(b"a OK"):
            raise ProtocolFailure("LOGIN failed")
        samples = []
        for index in range(job["warmup"] + job["count"]):
            started = time.perf_counter_ns()
            sock.sendall(b"n NOOP\r\n")
            reader.line(b"n ")
            elapsed = time.perf_counter_ns() - started
            if index >= job["warmup"]:
                samples.append(elapsed / 1000)
        sock.sendall(b"z LOGOUT\r\n")
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "max_us": samples[-1],
        "count": len(samples),
    }


class _BlockingLines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self, prefix: bytes) -> bytes:
        while True:
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                if line.startswith(prefix):
                    return line
            data = self.sock.recv(SMALL_READ_SIZE)
            if not data:
                raise ProtocolFailure(f"connection closed while waiting for {prefix!r}")
            self.buffer += data


# Process fan-out


def _worker_main(
    function: Callable[..., Any],
    job: dict[str, Any],
    results: Any,
    events: dict[str, Any] | None,
) -> None:
    try:
        if asyncio.iscoroutinefunction(function):
            _use_fast_loop()
            arguments = (job,) if events is None else (job, events)
            result = asyncio.run(function(*arguments))
        else:
            result = function(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a result
        result = {"error": f"{type(exc).__name__}: {exc}"}
    results.put({"result": result})


def _use_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class WorkerPool:
    """Worker processes started by fork, one per job, with a result queue."""

    def __init__(
        self,
        function: Callable[..., Coroutine[Any, Any, dict[str, Any]]]
        | Callable[..., Any],
        jobs: list[dict[str, Any]],
        *,
        with_events: bool = False,
    ) -> None:
        context = multiprocessing.get_context("fork")
        self.results = context.Queue()
        self.events = None
        self.early_results: list[dict[str, Any]] = []
        self.opened = 0
        if with_events:
            self.events = {"release": context.Event(), "results": self.results}
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(function, job, self.results, self.events),
                daemon=True,
            )
            for job in jobs
        ]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        """Return one result per worker, or an error entry for each one missing."""
        results = list(self.early_results)
        deadline = time.monotonic() + timeout
        while len(results) < len(self.processes):
            try:
                message = self.results.get(
                    timeout=max(0.1, deadline - time.monotonic())
                )
            except queue.Empty:
                break
            if "result" in message:
                results.append(message["result"])
        missing = len(self.processes) - len(results)
        results.extend(
            {"error": "worker returned no result in time"} for _ in range(missing)
        )
        return results

    def wait_ready(self, timeout: float) -> int:
        """Wait for every worker's `ready` message; return the total sessions opened."""
        ready = 0
        deadline = time.monotonic() + timeout
        for _ in self.processes:
            try:
                message = self.results.get(
                    timeout=max(0.1, deadline - time.monotonic())
                )
            except queue.Empty:
                break
            if "result" in message:
                # The worker failed before it was ready; collect() returns this.
                self.early_results.append(message["result"])
            ready += message.get("ready", 0)
        return ready

    def release(self) -> None:
        assert self.events is not None
        self.events["release"].set()

    def join(self) -> None:
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


def run_workers(
    function: Callable[..., Any], jobs: list[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    """Run one worker per job and return their results in arrival order."""
    pool = WorkerPool(function, jobs)
    pool.start()
    try:
        return pool.collect(timeout)
    finally:
        pool.join()


def endpoint_dict(endpoint: Endpoint) -> dict[str, Any]:
    return asdict(endpoint)
