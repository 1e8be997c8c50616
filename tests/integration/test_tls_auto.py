"""`tls: auto` against real Dovecot: the mode it picks, remembers and never lowers.

Dovecot variants offer implicit TLS and STARTTLS, STARTTLS only, or no TLS. A relay in
front of Dovecot can strip STARTTLS/STLS from what the server sends, as a network
attacker would, and can be pointed at another Dovecot to play a server that gains TLS.
The appliance runs as a real `appliance run` process; probes are counted by its log
lines and records are read from its state file.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import poplib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.appliance import ApplianceProcess, free_port, listener_config
from tests.support.dovecot import DovecotServer

HOST = "127.0.0.1"
TIMEOUT = 15.0
PASSWORD = "alice-secret"
PROBE_LINE = "probing imap://"
READY_LINE = "appliance ready"


@pytest.fixture(scope="module")
def both(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="both")


@pytest.fixture(scope="module")
def starttls_only(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="starttls")


@pytest.fixture(scope="module")
def no_tls(dovecot_factory) -> DovecotServer:
    return dovecot_factory(tls="none")


# The relay


class CapabilityRelay:
    """A TCP relay that can hide STARTTLS/STLS and records what the proxy sends.

    `target` is the port that new connections go to; `strip` applies to connections
    accepted after it is set. Runs its own event loop in a thread, because the tests
    block on mail clients.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.strip = False
        self.port = free_port()
        self.from_proxy = bytearray()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> CapabilityRelay:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        current = asyncio.current_task()
        pipes = [task for task in asyncio.all_tasks() if task is not current]
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, HOST, self.port)

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        strip = self.strip
        upstream_reader, upstream_writer = await asyncio.open_connection(
            HOST, self.target
        )
        await asyncio.gather(
            self._pipe(reader, upstream_writer, record=True),
            self._pipe(upstream_reader, writer, strip=strip),
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        record: bool = False,
        strip: bool = False,
    ) -> None:
        try:
            while True:
                data = await (reader.readline() if strip else reader.read(65536))
                if not data:
                    break
                if record:
                    self.from_proxy += data
                if strip:
                    data = _strip_starttls(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def _strip_starttls(line: bytes) -> bytes:
    if line.strip().upper() == b"STLS":
        return b""
    return line.replace(b" STARTTLS", b"")


# Appliance helpers


def upstream(port: int, dovecot: DovecotServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": HOST,
        "port": port,
        "tls": "auto",
        "ca_file": str(dovecot.ca_file),
        **extra,
    }


def appliance_config(
    imap: dict[str, Any] | None = None, pop3: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {"listeners": {}, "upstreams": {}, **top}
    for protocol, entry in (("imap", imap), ("pop3", pop3)):
        if entry is None:
            continue
        config["listeners"][protocol] = listener_config(protocol, protocol)
        config["upstreams"][protocol] = entry
    return config


def start(config: dict[str, Any], workdir: Path) -> ApplianceProcess:
    """Start the appliance and wait for its ready line, without a test connection."""
    appliance = ApplianceProcess(config, workdir, wait_ports=False)
    # A restarted appliance appends to the log file of the first run.
    ready_before = appliance.log_text().count(READY_LINE)
    appliance.start()
    deadline = time.monotonic() + TIMEOUT
    while appliance.log_text().count(READY_LINE) == ready_before:
        if appliance.process.poll() is not None or time.monotonic() > deadline:
            appliance.stop()
            raise RuntimeError(f"appliance did not start:\n{appliance.log_text()}")
        time.sleep(0.05)
    return appliance


@pytest.fixture
def appliances(tmp_path: Path) -> Iterator[list[ApplianceProcess]]:
    """Appliances that a test started; all are stopped at its end."""
    started: list[ApplianceProcess] = []
    yield started
    for appliance in started:
        appliance.stop()


def imap_login(port: int) -> str:
    """Log in and out through the appliance; return the server's LOGIN status."""
    client = imaplib.IMAP4(HOST, port, timeout=TIMEOUT)
    try:
        status, _ = client.login("alice", PASSWORD)
    finally:
        client.logout()
    return status


def pop3_login(port: int) -> bytes:
    client = poplib.POP3(HOST, port, timeout=TIMEOUT)
    try:
        client.user("alice")
        reply = client.pass_(PASSWORD)
    finally:
        client.quit()
    return reply


def first_line(port: int, send: bytes = b"") -> bytes:
    """Connect, send `send` at once, and return the first line the appliance sends."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        if send:
            sock.sendall(send)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def records(appliance: ApplianceProcess) -> dict[str, dict[str, Any]]:
    """Return the state file's records by protocol."""
    path = Path(appliance.config["state_dir"]) / "known_servers.json"
    servers = json.loads(path.read_text())["servers"]
    return {record["protocol"]: record for record in servers}


def wait_for_record(
    appliance: ApplianceProcess, protocol: str, mode: str
) -> dict[str, Any] | None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            record = records(appliance).get(protocol)
        except (OSError, ValueError):
            record = None
        if record is not None and record["mode"] == mode:
            return record
        time.sleep(0.05)
    return None


def wait_for_log(appliance: ApplianceProcess, text: str) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if text in appliance.log_text():
            return True
        time.sleep(0.05)
    return False


# Picking a mode


def test_auto_picks_implicit_tls(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    config = appliance_config(
        imap=upstream(both.ports["imaps"], both),
        pop3=upstream(both.ports["pop3s"], both),
    )
    appliance = start(config, tmp_path)
    appliances.append(appliance)

    imap_status = imap_login(appliance.port("imap"))
    pop3_reply = pop3_login(appliance.port("pop3"))
    learned = records(appliance)

    assert imap_status == "OK"
    assert pop3_reply.startswith(b"+OK")
    assert learned["imap"]["mode"] == "implicit"
    assert learned["pop3"]["mode"] == "implicit"
    assert learned["imap"]["tls_version"].startswith("TLSv1.")
    assert len(learned["imap"]["fingerprint_sha256"]) == 64


def test_auto_picks_starttls(
    starttls_only: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    dovecot = starttls_only
    config = appliance_config(
        imap=upstream(dovecot.ports["imap"], dovecot),
        pop3=upstream(dovecot.ports["pop3"], dovecot),
    )
    appliance = start(config, tmp_path)
    appliances.append(appliance)

    imap_status = imap_login(appliance.port("imap"))
    pop3_reply = pop3_login(appliance.port("pop3"))
    learned = records(appliance)

    assert imap_status == "OK"
    assert pop3_reply.startswith(b"+OK")
    assert learned["imap"]["mode"] == "starttls"
    assert learned["pop3"]["mode"] == "starttls"
    assert "upstream tls TLSv1." in appliance.log_text()


def test_auto_refuses_plain_text(
    no_tls: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    config = appliance_config(
        imap=upstream(no_tls.ports["imap"], no_tls),
        pop3=upstream(no_tls.ports["pop3"], no_tls),
    )
    appliance = start(config, tmp_path)
    appliances.append(appliance)

    imap_reply = first_line(appliance.port("imap"))
    pop3_reply = first_line(appliance.port("pop3"))
    log = appliance.log_text()

    assert imap_reply.startswith(b"* BYE [UNAVAILABLE]")
    assert pop3_reply.startswith(b"-ERR [SYS/TEMP]")
    assert "offered no TLS, only plain text" in log
    assert "upstreams.imap.allow_plaintext: true" in log
    assert records(appliance)["imap"]["mode"] == "none"


def test_auto_uses_plain_when_allowed(
    no_tls: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    config = appliance_config(
        imap=upstream(no_tls.ports["imap"], no_tls, allow_plaintext=True),
        pop3=upstream(no_tls.ports["pop3"], no_tls, allow_plaintext=True),
    )
    appliance = start(config, tmp_path)
    appliances.append(appliance)

    assert imap_login(appliance.port("imap")) == "OK"
    assert pop3_login(appliance.port("pop3")).startswith(b"+OK")
    assert records(appliance)["imap"]["mode"] == "none"


# Remembering


def test_record_survives_restart(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    config = appliance_config(imap=upstream(both.ports["imaps"], both))
    first = start(config, tmp_path)
    appliances.append(first)
    imap_login(first.port("imap"))
    first.stop()
    before = records(first)["imap"]

    second = start(config, tmp_path)
    appliances.append(second)
    status = imap_login(second.port("imap"))
    after = records(second)["imap"]

    assert status == "OK"
    assert second.log_text().count(PROBE_LINE) == 1
    assert after["mode"] == "implicit"
    assert after["last_probed"] == before["last_probed"]


def test_concurrent_first_sessions_probe_once(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    config = appliance_config(imap=upstream(both.ports["imaps"], both))
    appliance = start(config, tmp_path)
    appliances.append(appliance)
    port = appliance.port("imap")

    with ThreadPoolExecutor(max_workers=20) as pool:
        greetings = list(pool.map(lambda _: first_line(port), range(20)))

    assert all(line.startswith(b"* OK") for line in greetings)
    assert appliance.log_text().count(PROBE_LINE) == 1


# Downgrade and upgrade


def test_stripped_starttls_fails_closed(
    starttls_only: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    with CapabilityRelay(starttls_only.ports["imap"]) as relay:
        # allow_plaintext leaves the learned record as the only guard against plain text.
        entry = upstream(relay.port, starttls_only, allow_plaintext=True)
        appliance = start(appliance_config(imap=entry), tmp_path)
        appliances.append(appliance)
        assert imap_login(appliance.port("imap")) == "OK"
        relay.strip = True
        relay.from_proxy.clear()

        login = f"a1 LOGIN alice {PASSWORD}\r\n".encode()
        reply = first_line(appliance.port("imap"), send=login)
        downgrade_logged = wait_for_log(appliance, "looks like a downgrade")

    downgrade_lines = [
        line
        for line in appliance.log_text().splitlines()
        if "looks like a downgrade" in line
    ]
    assert reply.startswith(b"* BYE [UNAVAILABLE]")
    assert downgrade_logged
    assert all("[session=" in line for line in downgrade_lines)
    assert PASSWORD.encode() not in relay.from_proxy
    assert b"LOGIN" not in relay.from_proxy.upper()
    assert records(appliance)["imap"]["mode"] == "starttls"


def test_certificate_failure_not_called_downgrade(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    # The certificate is valid, but for another name than the one the appliance expects.
    entry = upstream(both.ports["imaps"], both, server_name="wrong-name.example.org")
    appliance = start(appliance_config(imap=entry), tmp_path)
    appliances.append(appliance)

    replies = [first_line(appliance.port("imap")) for _ in range(2)]
    line = appliance.wait_for_log("the certificate failed verification", TIMEOUT)

    assert all(reply.startswith(b"* BYE [UNAVAILABLE]") for reply in replies), replies
    assert "[session=" in line
    assert "wrong-name.example.org" in line
    assert "upstreams.imap.ca_file" in line
    assert "upstreams.imap.server_name" in line
    assert "looks like a downgrade" not in appliance.log_text()
    assert "known-servers forget" not in appliance.log_text()
    assert records(appliance)["imap"]["mode"] == "implicit"


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_stripped_first_probe_still_upgrades(
    protocol: str,
    starttls_only: DovecotServer,
    tmp_path: Path,
    appliances: list[ApplianceProcess],
) -> None:
    """An attacker who strips the first probe gets one plain-text login at most."""
    login = imap_login if protocol == "imap" else pop3_login
    with CapabilityRelay(starttls_only.ports[protocol]) as relay:
        relay.strip = True
        entry = upstream(relay.port, starttls_only, allow_plaintext=True)
        appliance = start(appliance_config(**{protocol: entry}), tmp_path)
        appliances.append(appliance)
        # The probe and this session both meet the stripped server.
        login(appliance.port(protocol))
        assert records(appliance)[protocol]["mode"] == "none"
        relay.strip = False
        relay.from_proxy.clear()

        second = login(appliance.port(protocol))
        moved = wait_for_record(appliance, protocol, "starttls")

    sent = bytes(relay.from_proxy).upper()
    assert second in ("OK", b"+OK Logged in.")
    assert (b"STARTTLS" if protocol == "imap" else b"STLS") in sent
    # The proxy logs in with AUTHENTICATE PLAIN (IMAP) or AUTH, USER and PASS (POP3).
    for command in (b"AUTHENTICATE", b"LOGIN", b"AUTH ", b"USER ", b"PASS "):
        assert command not in sent
    upgrade_lines = [
        line
        for line in appliance.log_text().splitlines()
        if "offered STARTTLS to a session" in line
    ]
    assert moved is not None
    assert upgrade_lines
    assert all("[session=" in line for line in upgrade_lines)


def age_records(appliance: ApplianceProcess, seconds: float) -> None:
    """Move every time in a stopped appliance's state file `seconds` into the past."""
    path = Path(appliance.config["state_dir"]) / "known_servers.json"
    document = json.loads(path.read_text())
    past = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()
    for record in document["servers"]:
        for field in ("first_seen", "last_seen", "last_probed"):
            record[field] = past
    path.write_text(json.dumps(document))


def test_plain_record_moves_up(
    no_tls: DovecotServer,
    starttls_only: DovecotServer,
    tmp_path: Path,
    appliances: list[ApplianceProcess],
) -> None:
    with CapabilityRelay(no_tls.ports["imap"]) as relay:
        entry = upstream(relay.port, starttls_only, allow_plaintext=True)
        # 60 s is the smallest max_record_age, so the record is aged on disk instead
        # of waiting for it.
        config = appliance_config(imap=entry, tls_auto={"max_record_age": 60})
        first = start(config, tmp_path)
        appliances.append(first)
        assert imap_login(first.port("imap")) == "OK"
        first.stop()
        assert records(first)["imap"]["mode"] == "none"
        age_records(first, 120)
        relay.target = starttls_only.ports["imap"]

        appliance = start(config, tmp_path)
        appliances.append(appliance)
        imap_login(appliance.port("imap"))
        moved = wait_for_record(appliance, "imap", "starttls")
        status = imap_login(appliance.port("imap"))

    assert moved is not None
    assert status == "OK"
    assert "moved up from none to starttls" in appliance.log_text()


# Damaged state


def test_corrupt_state_file_is_rebuilt(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "known_servers.json").write_text('{"format": 1, "servers": [')
    config = appliance_config(imap=upstream(both.ports["imaps"], both))
    appliance = start(config, tmp_path)
    appliances.append(appliance)

    status = imap_login(appliance.port("imap"))
    record = wait_for_record(appliance, "imap", "implicit")

    assert status == "OK"
    assert record is not None
    assert "unreadable or corrupt" in appliance.log_text()
    assert len(list(state.glob("known_servers.json.corrupt-*"))) == 1


def test_state_file_directory_keeps_serving(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    state = tmp_path / "state"
    (state / "known_servers.json").mkdir(parents=True)
    config = appliance_config(imap=upstream(both.ports["imaps"], both))
    appliance = start(config, tmp_path)
    appliances.append(appliance)

    status = imap_login(appliance.port("imap"))
    record = wait_for_record(appliance, "imap", "implicit")

    assert status == "OK"
    assert record is not None
    assert "Is a directory" in appliance.log_text()


def test_unwritable_state_dir_stops_start(both: DovecotServer, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state folder should be")
    config = appliance_config(
        imap=upstream(both.ports["imaps"], both), state_dir=str(blocker / "state")
    )
    appliance = ApplianceProcess(config, tmp_path / "app", wait_ports=False).start()

    code = appliance.process.wait(TIMEOUT)

    assert code == 1
    assert "cannot be created" in appliance.log_text()
    assert "tls_auto.persist_known_servers: false" in appliance.log_text()


def test_disabled_persistence_ignores_state_dir(
    both: DovecotServer, tmp_path: Path, appliances: list[ApplianceProcess]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state folder should be")
    config = appliance_config(
        imap=upstream(both.ports["imaps"], both),
        state_dir=str(blocker / "state"),
        tls_auto={"persist_known_servers": False},
    )
    appliance = start(config, tmp_path / "app")
    appliances.append(appliance)

    assert imap_login(appliance.port("imap")) == "OK"
    assert "persistence is off" in appliance.log_text()
