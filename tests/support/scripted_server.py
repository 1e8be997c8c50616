"""A scripted IMAP or POP3 server on loopback that can misbehave, and a raw line client.

`ScriptedServer` plays the mail server behind the proxy. Its `Script` sets the greeting,
whether STARTTLS (IMAP) or STLS (POP3) is offered, the bytes sent right after the
STARTTLS/STLS reply and before the TLS handshake, and the capabilities in the login
reply. The server accepts any credentials, unless the script makes it close or stay
silent once they arrive. It records every byte it receives, decrypted after a TLS
upgrade, so a test can check that no credentials ever reached it.

`LineClient` is a blocking client socket that writes raw bytes and reads raw lines and
literals, for tests that need exact control over what a mail client sends.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from tests.support.certs import CertFiles

PROTOCOLS = ("imap", "pop3")
# Commands that carry a user name or a password (or its SASL form) to the server.
CREDENTIAL_COMMANDS = frozenset(
    {"LOGIN", "AUTHENTICATE", "USER", "PASS", "AUTH", "APOP"}
)
# Values of Script.login_reply.
LOGIN_REPLIES = ("ok", "close", "none")
IO_TIMEOUT = 30.0
ACCEPT_POLL_INTERVAL = 0.1
# IMAP literal announcement at the end of a line: {5}, {5+} or ~{5}.
_LITERAL_END_RE = re.compile(rb"~?\{([0-9]+)(\+?)\}\r\n\Z")


@dataclass(frozen=True)
class Script:
    """What a `ScriptedServer` sends; the defaults describe a well-behaved server."""

    protocol: str = "imap"
    """`imap` or `pop3`."""
    greeting: bytes | None = None
    """Greeting line with CRLF, such as b"* PREAUTH ...\\r\\n". None sends an OK greeting."""
    offer_starttls: bool = True
    """Offer STARTTLS (IMAP) or STLS (POP3) before the TLS upgrade."""
    after_starttls_reply: bytes = b""
    """Bytes sent in the same write as the STARTTLS/STLS OK, before the handshake."""
    login_capabilities: tuple[str, ...] = ("IMAP4rev1", "IDLE")
    """IMAP capabilities in the [CAPABILITY ...] code of the login OK."""
    offer_sasl_plain: bool = True
    """List SASL PLAIN in the POP3 CAPA reply, so the proxy logs in with AUTH rather
    than USER and PASS."""
    starttls_reply_tag: bytes | None = None
    """IMAP tag of the STARTTLS reply. None uses the command's tag."""
    login_reply_tag: bytes | None = None
    """IMAP tag of the LOGIN and AUTHENTICATE replies. None uses the command's tag."""
    offer_id: bool = False
    """List ID (RFC 2971) among the IMAP capabilities."""
    id_status: bytes = b"OK"
    """Status of the tagged reply to ID, such as b"NO"."""
    login_refusal: bytes | None = None
    """Reply to a completed login instead of the usual one, such as b" NO [UNAVAILABLE]
    Try later\r\n" (after the tag, for IMAP) or b"-ERR [SYS/TEMP] Try later\r\n"."""
    login_reply_delay: float = 0.0
    """Seconds to wait before the reply to a completed login, as servers do before a
    rejection."""
    login_reply: str = "ok"
    """Reply to the command that completes a login (LOGIN, AUTHENTICATE, PASS, AUTH or
    APOP). `ok` sends the usual reply, `close` closes the connection without one, and
    `none` sends nothing and keeps reading. The usual reply to APOP is -ERR, because
    the server has no shared secret."""


@dataclass
class ConnectionRecord:
    """What the server received on one connection."""

    received: bytearray = field(default_factory=bytearray)
    """Every byte received, decrypted after a TLS upgrade."""
    commands: list[str] = field(default_factory=list)
    """Command names in upper case, in order. SASL response lines are not commands."""
    tls_active: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def credentials_received(self) -> bool:
        return any(name in CREDENTIAL_COMMANDS for name in self.commands)


class _ServerPeer:
    """One accepted socket with a line buffer, recording what it reads."""

    def __init__(self, sock: socket.socket, record: ConnectionRecord) -> None:
        self.sock = sock
        self.record = record
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes | None:
        """Return the next line with its LF, or None at end of stream."""
        while b"\n" not in self.buffer:
            if not self._receive():
                return None
        end = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    def read_exact(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not self._receive():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def start_tls(self, context: ssl.SSLContext) -> bool:
        """Run the server-side handshake and return whether it succeeded."""
        # Plaintext that arrived after STARTTLS/STLS is never treated as a command.
        self.buffer.clear()
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError):
            return False
        self.record.tls_active = True
        return True

    def _receive(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (OSError, ssl.SSLError):
            return False
        self.record.received += data
        self.buffer += data
        return bool(data)


class ScriptedServer:
    """A threaded IMAP or POP3 server on `host`:`port` that follows a `Script`.

    Every connection gets its own thread and `ConnectionRecord` in `records`. `cert`
    is needed only when the script offers STARTTLS/STLS.
    """

    def __init__(
        self,
        script: Script,
        *,
        cert: CertFiles | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if script.protocol not in PROTOCOLS:
            raise ValueError(
                f"invalid protocol {script.protocol!r}: expected {PROTOCOLS}"
            )
        if script.login_reply not in LOGIN_REPLIES:
            raise ValueError(
                f"invalid login_reply {script.login_reply!r}: expected {LOGIN_REPLIES}"
            )
        if script.offer_starttls and cert is None:
            raise ValueError(
                "cert is missing: a script that offers STARTTLS/STLS needs CertFiles "
                "for the handshake"
            )
        self.script = script
        self.host = host
        self.port = 0
        self.records: list[ConnectionRecord] = []
        self._context: ssl.SSLContext | None = None
        if cert is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(str(cert.cert_file), str(cert.key_file))
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._peers: list[_ServerPeer] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        listener = socket.create_server((self.host, 0))
        listener.settimeout(ACCEPT_POLL_INTERVAL)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopping.set()
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            _close_quietly(peer.sock)
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def received_bytes(self) -> bytes:
        """Return every byte received on every connection so far."""
        return b"".join(bytes(record.received) for record in list(self.records))

    def credentials_received(self) -> bool:
        return any(record.credentials_received for record in list(self.records))

    def wait_until_all_closed(self, timeout: float = IO_TIMEOUT) -> bool:
        """Return whether every connection accepted so far ended within `timeout`."""
        deadline = time.monotonic() + timeout
        for record in list(self.records):
            if not record.closed.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def wait_for_connections(self, count: int, timeout: float = IO_TIMEOUT) -> bool:
        """Return whether at least `count` connections arrived within `timeout`."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.records) >= count

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(IO_TIMEOUT)
            peer = _ServerPeer(sock, ConnectionRecord())
            with self._lock:
                self._peers.append(peer)
                self.records.append(peer.record)
            self._spawn(self._serve, peer)

    def _serve(self, peer: _ServerPeer) -> None:
        try:
            if self.script.protocol == "imap":
                self._serve_imap(peer)
            else:
                self._serve_pop3(peer)
        except (OSError, ssl.SSLError):
            pass
        finally:
            _close_quietly(peer.sock)
            peer.record.closed.set()

    # IMAP

    def _serve_imap(self, peer: _ServerPeer) -> None:
        peer.send(self.script.greeting or b"* OK Scripted IMAP server ready\r\n")
        while True:
            command = _read_imap_command(peer)
            if command is None:
                return
            words = command.split(b" ", 2)
            tag = words[0]
            name = (
                words[1].strip().decode("ascii", "replace").upper()
                if len(words) > 1
                else ""
            )
            peer.record.commands.append(name)
            if not self._answer_imap(peer, tag, name, words[2:]):
                return

    def _answer_imap(
        self, peer: _ServerPeer, tag: bytes, name: str, arguments: list[bytes]
    ) -> bool:
        """Send the reply to one command and return False when the connection must end."""
        if name == "CAPABILITY":
            caps = " ".join(self._imap_capabilities(peer.record.tls_active))
            peer.send(f"* CAPABILITY {caps}\r\n".encode() + tag + b" OK done\r\n")
        elif name == "STARTTLS" and self._starttls_offered(peer):
            peer.send(
                (self.script.starttls_reply_tag or tag)
                + b" OK Begin TLS negotiation now\r\n"
                + self.script.after_starttls_reply
            )
            assert self._context is not None
            return peer.start_tls(self._context)
        elif name == "AUTHENTICATE":
            has_initial_response = len(arguments[0].split()) > 1 if arguments else False
            if not has_initial_response:
                peer.send(b"+ \r\n")
                if peer.read_line() is None:
                    return False
            reply = (self.script.login_reply_tag or tag) + self._imap_login_reply()
            return self._reply_to_login(peer, reply)
        elif name == "LOGIN":
            reply = (self.script.login_reply_tag or tag) + self._imap_login_reply()
            return self._reply_to_login(peer, reply)
        elif name == "ID":
            peer.send(tag + b" " + self.script.id_status + b" ID done\r\n")
        elif name == "LOGOUT":
            peer.send(b"* BYE Logging out\r\n" + tag + b" OK done\r\n")
            return False
        else:
            peer.send(tag + b" OK done\r\n")
        return True

    def _reply_to_login(self, peer: _ServerPeer, reply: bytes) -> bool:
        """Handle a completed login as `Script.login_reply` sets; return False to close."""
        if self.script.login_reply == "close":
            return False
        if self.script.login_reply_delay:
            time.sleep(self.script.login_reply_delay)
        if self.script.login_reply == "ok":
            peer.send(reply)
        return True

    def _imap_capabilities(self, tls_active: bool) -> list[str]:
        caps = ["IMAP4rev1", "SASL-IR", "AUTH=PLAIN", "LITERAL+"]
        if self.script.offer_id:
            caps.append("ID")
        if self.script.offer_starttls and not tls_active:
            caps.append("STARTTLS")
        return caps

    def _imap_login_reply(self) -> bytes:
        if self.script.login_refusal is not None:
            return self.script.login_refusal
        caps = " ".join(self.script.login_capabilities)
        return f" OK [CAPABILITY {caps}] Logged in\r\n".encode()

    def _starttls_offered(self, peer: _ServerPeer) -> bool:
        return self.script.offer_starttls and not peer.record.tls_active

    # POP3

    def _pop3_login_reply(self, usual: bytes) -> bytes:
        return self.script.login_refusal if self.script.login_refusal is not None else usual

    def _serve_pop3(self, peer: _ServerPeer) -> None:
        peer.send(self.script.greeting or b"+OK Scripted POP3 server ready\r\n")
        while True:
            line = peer.read_line()
            if line is None:
                return
            words = line.strip().split(b" ")
            name = words[0].decode("ascii", "replace").upper()
            peer.record.commands.append(name)
            if not self._answer_pop3(peer, name, words[1:]):
                return

    def _answer_pop3(
        self, peer: _ServerPeer, name: str, arguments: list[bytes]
    ) -> bool:
        """Send the reply to one command and return False when the connection must end."""
        if name == "CAPA":
            lines = ["USER", "UIDL", "TOP"]
            if self.script.offer_sasl_plain:
                lines.insert(1, "SASL PLAIN")
            if self._starttls_offered(peer):
                lines.append("STLS")
            body = "".join(f"{line}\r\n" for line in lines)
            peer.send(f"+OK Capability list follows\r\n{body}.\r\n".encode())
        elif name == "STLS" and self._starttls_offered(peer):
            peer.send(
                b"+OK Begin TLS negotiation\r\n" + self.script.after_starttls_reply
            )
            assert self._context is not None
            return peer.start_tls(self._context)
        elif name == "AUTH":
            if len(arguments) < 2:
                peer.send(b"+ \r\n")
                if peer.read_line() is None:
                    return False
            return self._reply_to_login(peer, self._pop3_login_reply(b"+OK Logged in\r\n"))
        elif name == "USER":
            peer.send(b"+OK\r\n")
        elif name == "PASS":
            return self._reply_to_login(peer, self._pop3_login_reply(b"+OK\r\n"))
        elif name == "APOP":
            return self._reply_to_login(peer, b"-ERR Unknown command\r\n")
        elif name == "STAT":
            peer.send(b"+OK 0 0\r\n")
        elif name == "QUIT":
            peer.send(b"+OK Bye\r\n")
            return False
        else:
            peer.send(b"-ERR Unknown command\r\n")
        return True


def _read_imap_command(peer: _ServerPeer) -> bytes | None:
    """Return one IMAP command with its literals inlined, or None at end of stream."""
    command = b""
    while True:
        line = peer.read_line()
        if line is None:
            return None
        literal = _LITERAL_END_RE.search(line)
        if literal is None:
            return command + line
        if not literal.group(2):
            peer.send(b"+ Ready for literal data\r\n")
        data = peer.read_exact(int(literal.group(1)))
        if data is None:
            return None
        command += line + data


def _close_quietly(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket, but close() may not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class LineClient:
    """A blocking client socket for raw IMAP or POP3 exchanges in tests.

    Reads fail with TimeoutError after `timeout` seconds, and with ConnectionError when
    the server closes the connection in the middle of a line.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
        timeout: float = IO_TIMEOUT,
    ) -> None:
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout
        )
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.buffer = bytearray()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """Return the next line with its CRLF, or b"" when the server closed the stream."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                if self.buffer:
                    raise ConnectionError("connection closed in the middle of a line")
                return b""
            self.buffer += data
        end = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed before {size} bytes arrived")
            self.buffer += data
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_response(self) -> bytes:
        """Return one IMAP response with its literals, or b"" at end of stream."""
        response = b""
        while True:
            line = self.read_line()
            if not line:
                return response
            response += line
            literal = _LITERAL_END_RE.search(line)
            if literal is None:
                return response
            response += self.read_exact(int(literal.group(1)))

    def read_until_tagged(self, tag: bytes) -> list[bytes]:
        """Return the IMAP responses up to and including the one tagged `tag`.

        Raises ConnectionError when the stream ends first.
        """
        responses = []
        while True:
            response = self.read_response()
            if not response:
                raise ConnectionError(f"stream ended before the reply tagged {tag!r}")
            responses.append(response)
            if response.startswith(tag + b" "):
                return responses

    def read_until_closed(self) -> bytes:
        """Return everything the server sends until it closes the connection."""
        chunks = [bytes(self.buffer)]
        self.buffer.clear()
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def start_tls(
        self, context: ssl.SSLContext, server_hostname: str = "localhost"
    ) -> None:
        """Upgrade to TLS; bytes already buffered from before the upgrade are an error."""
        if self.buffer:
            raise AssertionError(
                f"server sent bytes before the TLS handshake: {self.buffer!r}"
            )
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        _close_quietly(self.sock)


@dataclass(frozen=True)
class Step:
    """One client turn of an IMAP exchange: bytes to send and the reply expected."""

    send: bytes = field(repr=False)
    expect: bytes
    """Prefix of the reply. A "+" prefix reads one continuation request, any other
    prefix starts with a tag and reads through the reply with that tag."""


def converse(client: LineClient, steps: list[Step]) -> list[bytes]:
    """Run `steps` and return the replies of the last one; fails on an unexpected reply."""
    replies: list[bytes] = []
    for step in steps:
        client.send(step.send)
        if step.expect.startswith(b"+"):
            replies = [client.read_line()]
        else:
            replies = client.read_until_tagged(step.expect.split(b" ")[0])
        if not replies[-1].startswith(step.expect):
            raise AssertionError(
                f"expected a reply starting {step.expect!r}, got {replies[-1]!r}"
            )
    return replies


def imap_quoted(value: bytes) -> bytes:
    """Encode `value` as an IMAP quoted string."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def imap_login_exchanges(user: bytes, password: bytes) -> dict[str, list[Step]]:
    """Return every way a client can log in, by name, each tagged a1 and ending in OK.

    Covers LOGIN with quoted strings, synchronizing literals and LITERAL+ literals, and
    AUTHENTICATE PLAIN (RFC 4616) with and without SASL-IR, and AUTHENTICATE LOGIN
    with and without an initial response.
    """
    plain = base64.b64encode(b"\0" + user + b"\0" + password)
    user_b64 = base64.b64encode(user)
    password_b64 = base64.b64encode(password)
    username_challenge = b"+ " + base64.b64encode(b"Username:")
    password_challenge = b"+ " + base64.b64encode(b"Password:")
    return {
        "login-quoted": [
            Step(
                b"a1 LOGIN "
                + imap_quoted(user)
                + b" "
                + imap_quoted(password)
                + b"\r\n",
                b"a1 OK",
            ),
        ],
        "login-literals": [
            Step(b"a1 LOGIN {%d}\r\n" % len(user), b"+"),
            Step(user + b" {%d}\r\n" % len(password), b"+"),
            Step(password + b"\r\n", b"a1 OK"),
        ],
        "login-literal-plus": [
            Step(
                b"a1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n"
                % (len(user), user, len(password), password),
                b"a1 OK",
            ),
        ],
        "plain-initial-response": [
            Step(b"a1 AUTHENTICATE PLAIN " + plain + b"\r\n", b"a1 OK"),
        ],
        "plain-continuation": [
            Step(b"a1 AUTHENTICATE PLAIN\r\n", b"+"),
            Step(plain + b"\r\n", b"a1 OK"),
        ],
        "login-mechanism": [
            Step(b"a1 AUTHENTICATE LOGIN\r\n", username_challenge),
            Step(user_b64 + b"\r\n", password_challenge),
            Step(password_b64 + b"\r\n", b"a1 OK"),
        ],
        "login-mechanism-initial-response": [
            Step(b"a1 AUTHENTICATE LOGIN " + user_b64 + b"\r\n", password_challenge),
            Step(password_b64 + b"\r\n", b"a1 OK"),
        ],
    }
