"""Hypothesis drives the IMAP and POP3 sessions before login with random client input.

Each example runs a real ImapSession or Pop3Session on in-memory transports: the client
side gets the input in random chunks and then end of stream, and the upstream is a fake
server that accepts the password `right`. STARTTLS/STLS is simulated by marking the
client transport as TLS, because a real handshake needs sockets.

Invariants: `pre_auth` ends within a few seconds with a login result, the client's end of
stream or the project's ClientProtocolError, and nothing else. Every reply to the client
is whole CRLF lines. No credential reaches the upstream before TLS on a `starttls`
listener, and a login succeeds only with the right password.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from appliance.config import AppConfig
from appliance.protocols.errors import ClientProtocolError, TooManyProtocolErrors
from appliance.protocols.imap import Command, CommandReader, ContinuationRequest
from appliance.proxy import imap_session, pop3_session
from appliance.proxy.connection import Connection, ConnectionClosed
from appliance.proxy.session import SessionEnd, SessionEnv, Snapshot
from appliance.proxy.upstream import UpstreamTarget

# Generous, so that a loaded CI machine does not flake. A session over a few hundred
# bytes of in-memory input finishes in milliseconds unless it waits forever.
RUN_TIMEOUT = 5.0
CLIENT_PEER = ("192.0.2.10", 40000)
LISTENER_MODES = ("none", "starttls")
CREDENTIAL_WORDS = (b"LOGIN", b"AUTHENTICATE", b"USER", b"PASS", b"AUTH", b"APOP")
# Upstream targets need a context, but the fake upstream speaks plain text only.
UNUSED_CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


RIGHT_PLAIN = plain(b"user", b"right")
WRONG_PLAIN = plain(b"user", b"wrong")

IMAP_FRAGMENTS = [
    b"a1 ",
    b"a2 ",
    b"* ",
    b" ",
    b"LOGIN ",
    b"LOGIN user right",
    b"LOGIN user wrong",
    b"AUTHENTICATE PLAIN",
    b"AUTHENTICATE PLAIN " + RIGHT_PLAIN,
    b"AUTHENTICATE LOGIN",
    b"AUTHENTICATE X-UNKNOWN",
    b"STARTTLS",
    b"CAPABILITY",
    b"NOOP",
    b"LOGOUT",
    b"ID (",
    b'"name" "x")',
    b"FROB",
    b"NIL",
    b'"user"',
    b'"us\\er"',
    b'"',
    b"\\",
    b"(",
    b")",
    b"{4}",
    b"{5}",
    b"{5+}",
    b"{0}",
    b"~{3}",
    b"{}",
    b"{-1}",
    b"{x}",
    b"{4000000000}",
    b"{18446744073709551617}",
    b"{18446744073709551617+}",
    b"user",
    b"right",
    RIGHT_PLAIN,
    WRONG_PLAIN,
    base64.b64encode(b"user"),
    base64.b64encode(b"right"),
    b"=",
    b"*",
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"\xc3\xa9",
    b"\xff",
]

POP3_FRAGMENTS = [
    b"USER ",
    b"USER user",
    b"PASS ",
    b"PASS right",
    b"PASS wrong",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH PLAIN " + RIGHT_PLAIN,
    b"AUTH PLAIN " + WRONG_PLAIN,
    b"AUTH LOGIN",
    b"AUTH X-UNKNOWN",
    b"APOP user 0123456789abcdef0123456789abcdef",
    b"CAPA",
    b"STLS",
    b"NOOP",
    b"QUIT",
    b"FROB",
    b"US3R",
    b" ",
    b"user",
    b"right",
    RIGHT_PLAIN,
    WRONG_PLAIN,
    base64.b64encode(b"user"),
    base64.b64encode(b"right"),
    b"=",
    b"*",
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"\xc3\xa9",
    b"\xff",
]


# In-memory transports


class FakeSSLObject:
    """What Connection.tls_info reads from a TLS transport."""

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)


class FakeTransport:
    """An asyncio transport in memory: writes go to `on_write`, close is scheduled."""

    def __init__(self, on_write: Callable[[bytes], None]) -> None:
        self.on_write = on_write
        self.protocol: Connection | None = None
        self.closing = False
        self.tls = False

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.on_write(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        assert self.protocol is not None
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return CLIENT_PEER
        if name == "ssl_object" and self.tls:
            return FakeSSLObject()
        return default


def attach(on_write: Callable[[bytes], None]) -> tuple[Connection, FakeTransport]:
    connection = Connection()
    transport = FakeTransport(on_write)
    transport.protocol = connection
    connection.connection_made(transport)  # type: ignore[arg-type]
    return connection, transport


# Fake upstream servers


class FakeUpstream:
    """A sans-IO mail server: `receive` takes the proxy's bytes, replies go back."""

    greeting = b""

    def __init__(self) -> None:
        self.received = bytearray()
        self.logged_in = False
        self.credentials_before_tls = False
        self.connection: Connection | None = None
        self._buffer = bytearray()

    def open(self, client_tls: Callable[[], bool]) -> Connection:
        self.client_tls = client_tls
        self.connection, _ = attach(self.receive)
        self.reply(self.greeting)
        return self.connection

    def reply(self, data: bytes) -> None:
        assert self.connection is not None
        loop = asyncio.get_running_loop()
        loop.call_soon(self.connection.data_received, data)

    def receive(self, data: bytes) -> None:
        self.received += data
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, rest = bytes(self._buffer).partition(b"\n")
            self._buffer = bytearray(rest)
            words = line.rstrip(b"\r").split(b" ")
            if any(word.upper() in CREDENTIAL_WORDS for word in words[:2]):
                self.credentials_before_tls |= not self.client_tls()
            self.answer(words)

    def check(self, response: bytes) -> bool:
        try:
            _, _, password = base64.b64decode(response, validate=True).split(b"\0")
        except ValueError:
            return False
        self.logged_in = password == b"right"
        return self.logged_in

    def answer(self, words: list[bytes]) -> None:
        raise NotImplementedError


class FakeImapUpstream(FakeUpstream):
    greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID LITERAL+] ready\r\n"

    def answer(self, words: list[bytes]) -> None:
        tag = words[0]
        name = words[1].upper() if len(words) > 1 else b""
        if name == b"CAPABILITY":
            self.reply(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID\r\n")
            self.reply(tag + b" OK done\r\n")
        elif name == b"AUTHENTICATE" and len(words) == 4 and self.check(words[3]):
            self.reply(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        elif name == b"AUTHENTICATE":
            self.reply(tag + b" NO [AUTHENTICATIONFAILED] Failed\r\n")
        else:
            self.reply(tag + b" OK done\r\n")


class FakePop3Upstream(FakeUpstream):
    greeting = b"+OK ready\r\n"

    def answer(self, words: list[bytes]) -> None:
        name = words[0].upper()
        if name == b"CAPA":
            self.reply(b"+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n")
        elif name == b"AUTH" and len(words) == 3 and self.check(words[2]):
            self.reply(b"+OK Logged in\r\n")
        elif name == b"QUIT":
            self.reply(b"+OK Bye\r\n")
        else:
            self.reply(b"-ERR [AUTH] Failed\r\n")


# Sessions with simulated TLS


class FuzzImapSession(imap_session.ImapSession):
    async def start_client_tls(self) -> None:
        self.client.take_buffer()
        self.client.transport.tls = True  # type: ignore[union-attr]


class FuzzPop3Session(pop3_session.Pop3Session):
    async def start_client_tls(self) -> None:
        self.client.take_buffer()
        self.client.transport.tls = True  # type: ignore[union-attr]


PROTOCOLS = {
    "imap": (FuzzImapSession, FakeImapUpstream, imap_session),
    "pop3": (FuzzPop3Session, FakePop3Upstream, pop3_session),
}


@pytest.fixture(scope="module")
def configs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], AppConfig]:
    # The files only need to exist: the simulated STARTTLS never loads them.
    folder: Path = tmp_path_factory.mktemp("fuzz-cert")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_text("unused")
    key_file.write_text("unused")
    configs = {}
    for protocol in PROTOCOLS:
        for mode in LISTENER_MODES:
            listener: dict[str, Any] = {
                "protocol": protocol,
                "port": 1143,
                "tls": mode,
                "upstream": "fake",
            }
            if mode != "none":
                listener.update(cert_file=str(cert_file), key_file=str(key_file))
            configs[protocol, mode] = AppConfig(
                listeners={"fuzz": listener},
                upstreams={"fake": {"host": "127.0.0.1", "port": 1, "tls": "none"}},
                limits={
                    "max_line_length": 512,
                    "max_literal_size": 64,
                    "max_protocol_errors": 8,
                    "auth_failure_delay": 0,
                },
            )
    return configs


class Outcome:
    """What one session run returned or raised, and what each side received."""

    def __init__(self) -> None:
        self.result: bool | None = None
        self.error: BaseException | None = None
        self.client_output = bytearray()
        self.upstream: FakeUpstream | None = None
        self.session: Any = None


async def run_pre_auth(
    config: AppConfig, protocol: str, chunks: list[bytes]
) -> Outcome:
    session_class, upstream_class, module = PROTOCOLS[protocol]
    outcome = Outcome()
    upstream = upstream_class()
    outcome.upstream = upstream
    client, client_transport = attach(outcome.client_output.extend)

    async def plan_upstream(name: str, protocol: str) -> list[UpstreamTarget]:
        return [
            UpstreamTarget(name, "127.0.0.1", 1, "none", UNUSED_CONTEXT, "127.0.0.1")
        ]

    async def open_upstream(
        target: UpstreamTarget, *options: Any, **settings: Any
    ) -> Connection:
        return upstream.open(lambda: client_transport.tls)

    async def feed() -> None:
        for chunk in chunks:
            client.data_received(chunk)
            for _ in range(3):
                await asyncio.sleep(0)
        client.eof_received()

    snapshot = Snapshot(config, contexts=None)  # type: ignore[arg-type]
    env = SessionEnv(
        listener_name="fuzz", snapshot=snapshot, plan_upstream=plan_upstream
    )
    session = session_class(env, client)
    outcome.session = session
    with mock.patch.object(module, "open_upstream", open_upstream):
        feeder = asyncio.get_running_loop().create_task(feed())
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                outcome.result = await session.pre_auth()
        except (ClientProtocolError, ConnectionClosed, SessionEnd) as error:
            # SessionEnd: a deliberate close, such as a TLS ClientHello on this port.
            outcome.error = error
        finally:
            feeder.cancel()
    return outcome


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(points) if end > start]


def client_input(fragments: list[bytes]) -> st.SearchStrategy[bytes]:
    token = st.one_of(st.sampled_from(fragments), st.binary(max_size=12))
    return st.lists(token, max_size=40).map(b"".join)


FUZZ_SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def check_outcome(outcome: Outcome, mode: str, data: bytes) -> None:
    upstream = outcome.upstream
    assert upstream is not None
    assert outcome.client_output.endswith(b"\r\n")
    if mode == "starttls":
        assert not upstream.credentials_before_tls
    if outcome.result:
        assert upstream.logged_in


@pytest.mark.parametrize("mode", LISTENER_MODES)
@FUZZ_SETTINGS
@given(
    data=client_input(IMAP_FRAGMENTS), cuts=st.lists(st.integers(0, 2000), max_size=8)
)
def test_imap_pre_auth_survives_random_input(configs, mode, data, cuts):
    outcome = asyncio.run(
        run_pre_auth(configs["imap", mode], "imap", split(data, cuts))
    )
    check_outcome(outcome, mode, data)


@pytest.mark.parametrize("mode", LISTENER_MODES)
@FUZZ_SETTINGS
@given(
    data=client_input(POP3_FRAGMENTS), cuts=st.lists(st.integers(0, 2000), max_size=8)
)
def test_pop3_pre_auth_survives_random_input(configs, mode, data, cuts):
    outcome = asyncio.run(
        run_pre_auth(configs["pop3", mode], "pop3", split(data, cuts))
    )
    check_outcome(outcome, mode, data)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@FUZZ_SETTINGS
@given(
    lines=st.lists(
        st.sampled_from([b"\r\n", b"a1 NOOP\r\n", b"CAPA\r\n", b"\0\r\n", b"{1}\r\n"]),
        max_size=30,
    )
)
def test_session_answers_every_line(configs, protocol, lines):
    outcome = asyncio.run(run_pre_auth(configs[protocol, "none"], protocol, lines))
    assert outcome.client_output.count(b"\r\n") >= 1
    assert isinstance(outcome.error, (ClientProtocolError, ConnectionClosed))


def test_right_password_logs_in(configs):
    data = b"a1 AUTHENTICATE PLAIN " + RIGHT_PLAIN + b"\r\n"
    outcome = asyncio.run(run_pre_auth(configs["imap", "none"], "imap", [data]))
    assert outcome.result is True
    assert outcome.upstream is not None
    assert outcome.upstream.logged_in


# CPython 3.11 shares one key table among the __dict__s of a class's instances, with
# room for at most 30 names, and each new instance leaves one less slot for names that no
# instance has set yet. A name first set after the room is gone gives every session a
# dict of its own: the benchmark's memory per idle session rose from 9.3 to 11 KiB on
# uvloop when a login began to set a new name. So Session.__init__ sets every name, and
# the first instance puts them all into the table while it still has room.
MAX_SESSION_ATTRIBUTES = 29


def names_set_in_init(session_class: type) -> tuple[dict[type, set[str]], Any]:
    """Wrap `session_class.__init__` to record the names each instance has after it."""
    recorded: dict[type, set[str]] = {}
    original = session_class.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        recorded[type(self)] = set(vars(self))

    return recorded, init


@pytest.mark.parametrize(
    ("protocol", "data"),
    [
        ("imap", b"a1 AUTHENTICATE PLAIN " + RIGHT_PLAIN + b"\r\n"),
        ("imap", b"a1 LOGIN user wrong\r\na2 LOGIN user right\r\n"),
        ("pop3", b"AUTH PLAIN " + RIGHT_PLAIN + b"\r\n"),
        ("pop3", b"USER user\r\nPASS wrong\r\nUSER user\r\nPASS right\r\n"),
    ],
)
def test_session_sets_every_attribute_in_init(configs, protocol, data, monkeypatch):
    session_class = PROTOCOLS[protocol][0]
    recorded, init = names_set_in_init(session_class)
    monkeypatch.setattr(session_class, "__init__", init)

    outcome = asyncio.run(run_pre_auth(configs[protocol, "none"], protocol, [data]))

    assert outcome.result is True
    in_init = recorded[session_class]
    assert len(in_init) <= MAX_SESSION_ATTRIBUTES, sorted(in_init)
    assert set(vars(outcome.session)) <= in_init, sorted(set(vars(outcome.session)) - in_init)


def test_login_literal_before_starttls_refused(configs):
    steps = [b"a1 LOGIN {4}\r\n", b"a2 NOOP\r\n"]
    outcome = asyncio.run(run_pre_auth(configs["imap", "starttls"], "imap", steps))
    lines = bytes(outcome.client_output).split(b"\r\n")
    assert not any(line.startswith(b"+") for line in lines), lines
    assert b"a1 NO [PRIVACYREQUIRED]" in lines[1], lines
    # The literal's bytes may follow unasked, so nothing after the rejection is read.
    assert not any(line.startswith(b"a2") for line in lines), lines
    assert isinstance(outcome.error, ClientProtocolError)
    assert outcome.error.fatal


def test_unwaited_login_literal_never_parsed(configs):
    data = b"a1 LOGIN {4}\r\nuser {5}\r\nright\r\n"
    outcome = asyncio.run(run_pre_auth(configs["imap", "starttls"], "imap", [data]))
    assert isinstance(outcome.error, ClientProtocolError)
    assert outcome.error.fatal
    assert b"right" not in outcome.client_output
    assert outcome.upstream is not None
    assert not outcome.upstream.credentials_before_tls


# Lines whose literal gets BAD instead of "+". Each is followed by what a client that
# does not wait for "+" sends next: the literal "mypass" and a command.
REJECTED_LITERALS = {
    "over-long": b"a1 LOGIN " + b"x" * 600 + b" {6}\r\n",
    "over-long+": b"a1 LOGIN " + b"x" * 600 + b" {6+}\r\n",
    "invalid-tag": b"a*1 LOGIN {6}\r\n",
    "login-third": b"a1 LOGIN user right {6}\r\n",
    "login-list": b"a1 LOGIN ({6}\r\n",
    "login-after-list": b"a1 LOGIN (user) {6}\r\n",
    "sasl-mechanism": b"a1 AUTHENTICATE {6}\r\n",
    "sasl-third": b"a1 AUTHENTICATE PLAIN " + RIGHT_PLAIN + b" {6}\r\n",
    "select-unbalanced": b"a1 SELECT ) {6}\r\n",
    "id-over-max-literal-size": b"a1 ID {65}\r\n",
}


@pytest.mark.parametrize("case", REJECTED_LITERALS, ids=list(REJECTED_LITERALS))
def test_rejected_literal_closes_session(configs, case):
    data = REJECTED_LITERALS[case] + b"mypass\r\na2 NOOP\r\n"
    outcome = asyncio.run(run_pre_auth(configs["imap", "none"], "imap", [data]))
    lines = bytes(outcome.client_output).split(b"\r\n")
    assert lines[1].startswith((b"a1 BAD ", b"* BAD ")), lines
    assert not any(line.startswith(b"+") for line in lines), lines
    assert not any(line.startswith(b"a2") for line in lines), lines
    assert b"mypass" not in outcome.client_output
    assert isinstance(outcome.error, ClientProtocolError)
    assert outcome.error.fatal
    assert outcome.upstream is not None
    assert not outcome.upstream.logged_in


def test_ninth_literal_closes_session(configs):
    # The reader takes 8 literals per command, and the 9th's bytes follow unasked.
    eight_literals = b"a1 ID ({1}\r\n" + b"x {1}\r\n" * 7
    data = eight_literals + b"x {6}\r\nmypass\r\na2 NOOP\r\n"
    outcome = asyncio.run(run_pre_auth(configs["imap", "none"], "imap", [data]))
    lines = bytes(outcome.client_output).split(b"\r\n")
    assert lines[1:9] == [b"+ Ready for literal data"] * 8, lines
    assert lines[9] == b"a1 BAD too many literals (limit 8)", lines
    assert not any(line.startswith(b"a2") for line in lines), lines
    assert b"mypass" not in outcome.client_output
    assert isinstance(outcome.error, ClientProtocolError)
    assert outcome.error.fatal


def test_authenticate_extra_argument_rejected(configs):
    data = b"a1 AUTHENTICATE PLAIN " + RIGHT_PLAIN + b" extra\r\n"
    outcome = asyncio.run(run_pre_auth(configs["imap", "none"], "imap", [data]))
    lines = bytes(outcome.client_output).split(b"\r\n")
    assert lines[1] == b"a1 BAD AUTHENTICATE takes at most 2 arguments", lines
    assert outcome.result is not True
    assert outcome.upstream is not None
    assert not outcome.upstream.logged_in


def test_starttls_then_login_succeeds(configs):
    steps = [b"a1 STARTTLS\r\n", b"a2 LOGIN user right\r\n"]
    outcome = asyncio.run(run_pre_auth(configs["imap", "starttls"], "imap", steps))
    assert outcome.result is True


@pytest.mark.parametrize("name", [b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS"])
def test_imap_argument_to_bare_command_rejected(configs, name):
    steps = [b"e " + name + b" extra\r\n", b"a2 NOOP\r\n"]
    outcome = asyncio.run(run_pre_auth(configs["imap", "starttls"], "imap", steps))
    lines = bytes(outcome.client_output).split(b"\r\n")
    assert lines[1] == b"e BAD " + name + b" takes no arguments", lines
    assert lines[2].startswith(b"a2 OK"), lines


@pytest.mark.parametrize("name", [b"CAPA", b"STLS", b"QUIT"])
def test_pop3_argument_to_bare_command_rejected(configs, name):
    steps = [name + b" extra\r\n", b"USER user\r\n"]
    outcome = asyncio.run(run_pre_auth(configs["pop3", "starttls"], "pop3", steps))
    lines = bytes(outcome.client_output).split(b"\r\n")
    assert lines[1] == b"-ERR " + name + b" takes no arguments", lines
    assert lines[2].startswith(b"-ERR [AUTH] Login is disabled"), lines


def test_argument_errors_use_error_budget(configs):
    steps = [b"e%d NOOP x\r\n" % number for number in range(8)]
    outcome = asyncio.run(run_pre_auth(configs["imap", "none"], "imap", steps))
    assert isinstance(outcome.error, TooManyProtocolErrors)


# Logins that the proxy rejects without asking the upstream, one of each kind, by
# protocol, listener TLS mode and case.
FOREIGN_AUTHZID_PLAIN = base64.b64encode(b"admin\0user\0right")
REJECTED_LOGINS = {
    ("imap", "none", "authzid"): b"a1 AUTHENTICATE PLAIN %s\r\n" % FOREIGN_AUTHZID_PLAIN,
    ("imap", "none", "mechanism"): b"a1 AUTHENTICATE X-UNKNOWN\r\n",
    ("imap", "starttls", "before-tls"): b"a1 LOGIN user right\r\n",
    ("pop3", "none", "authzid"): b"AUTH PLAIN " + FOREIGN_AUTHZID_PLAIN + b"\r\n",
    ("pop3", "none", "mechanism"): b"AUTH X-UNKNOWN\r\n",
    ("pop3", "starttls", "before-tls"): b"AUTH PLAIN " + RIGHT_PLAIN + b"\r\n",
    ("pop3", "starttls", "user-pass-before-tls"): b"USER user\r\nPASS right\r\n",
}


@pytest.fixture
def login_lines() -> Iterator[list[str]]:
    """Collect the `login ...` lines that sessions log."""
    lines: list[str] = []
    handler = logger.add(
        lambda message: lines.append(message.record["message"]),
        filter=lambda record: record["message"].startswith("login "),
    )
    yield lines
    logger.remove(handler)


@pytest.mark.parametrize("key", REJECTED_LOGINS, ids="-".join)
def test_rejected_logins_use_error_budget(configs, login_lines, key):
    protocol, mode, _ = key
    config = configs[protocol, mode]
    budget = config.limits.max_protocol_errors
    data = REJECTED_LOGINS[key] * (budget + 5)
    outcome = asyncio.run(run_pre_auth(config, protocol, [data]))
    assert isinstance(outcome.error, TooManyProtocolErrors), outcome.error
    assert len(login_lines) == budget, login_lines
    assert all(line.startswith("login rejected: ") for line in login_lines)
    assert outcome.upstream is not None
    assert not outcome.upstream.logged_in


@pytest.mark.parametrize(
    ("protocol", "exchange"),
    [("imap", b"a1 AUTHENTICATE PLAIN\r\n*\r\n"), ("pop3", b"AUTH PLAIN\r\n*\r\n")],
)
def test_cancelled_logins_use_error_budget(configs, login_lines, protocol, exchange):
    config = configs[protocol, "none"]
    budget = config.limits.max_protocol_errors
    outcome = asyncio.run(run_pre_auth(config, protocol, [exchange * (budget + 5)]))
    assert isinstance(outcome.error, TooManyProtocolErrors), outcome.error
    assert len(login_lines) == budget, login_lines
    assert all(line.startswith("login cancelled: ") for line in login_lines)


def test_pop3_user_pass_before_tls_logged_once(configs, login_lines):
    data = b"USER alice\r\nPASS right\r\nUSER bob\r\n"
    outcome = asyncio.run(run_pre_auth(configs["pop3", "starttls"], "pop3", [data]))
    replies = bytes(outcome.client_output).split(b"\r\n")[1:-1]
    assert len(replies) == 3, replies
    assert all(reply.startswith(b"-ERR [AUTH] Login is disabled") for reply in replies)
    assert len(login_lines) == 2, login_lines
    assert login_lines[0].endswith(' user "alice"'), login_lines
    assert login_lines[1].endswith(' user "bob"'), login_lines
    assert outcome.session.errors == 2


# CommandReader.reject_literal, which the IMAP session uses before TLS


def reject_then_read(chunks: list[bytes], after: bytes) -> list[object]:
    """Feed `chunks`, reject the announced literal, feed `after`, return the events."""
    reader = CommandReader()
    events: list[object] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (event := reader.next_event()) is not None:
            events.append(event)
            if isinstance(event, ContinuationRequest):
                reader.reject_literal()
    reader.feed(after)
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


ANNOUNCEMENT = b"a1 LOGIN user {5}\r\n"
NEXT_COMMAND = b"a2 NOOP\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        [ANNOUNCEMENT],
        [bytes([byte]) for byte in ANNOUNCEMENT],
        [ANNOUNCEMENT + NEXT_COMMAND],
    ],
    ids=["whole", "bytewise", "trailing"],
)
def test_reject_literal_reads_next_command(chunks):
    after = b"" if chunks[-1].endswith(NEXT_COMMAND) else NEXT_COMMAND
    events = reject_then_read(chunks, after)
    assert events[0] == ContinuationRequest()
    assert events[0].tag == "a1"
    assert events[0].name == "LOGIN"
    assert events[1:] == [Command("a2", "NOOP")]


def test_reject_literal_needs_announcement():
    reader = CommandReader()
    with pytest.raises(RuntimeError, match="without a literal announcement"):
        reader.reject_literal()


def test_reject_literal_after_read_started_fails():
    reader = CommandReader()
    reader.feed(ANNOUNCEMENT)
    assert isinstance(reader.next_event(), ContinuationRequest)
    assert reader.next_event() is None
    with pytest.raises(RuntimeError):
        reader.reject_literal()
