"""Find out which upstream TLS modes a mail server offers, without logging in.

A probe opens two connections in parallel. The first starts TLS at once, on the
implicit-TLS port (RFC 8314). The second goes to the plain port, reads the greeting and
the capabilities, and then tries STARTTLS (IMAP, RFC 3501) or STLS (POP3, RFC 2595).
With a fixed `port` both connections go to that one port. Each mode is reported as offered or not, usable or
not, with the negotiated TLS version, cipher and server certificate.

"Offered" is the safety-relevant answer. A TLS mode counts as offered as soon as the
server shows TLS: a STARTTLS/STLS capability, a certificate, or a TLS alert. A mode that
is offered but not usable (for example a certificate that does not verify) still rules
out plain text under `tls: auto`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance.config.models import default_port
from appliance.files import openssl_path
from appliance.logs import describe_error
from appliance.protocols import capabilities as capability_lists
from appliance.protocols.errors import UpstreamProtocolError
from appliance.protocols.imap import Response as ImapResponse
from appliance.protocols.imap import ResponseReader as ImapResponseReader
from appliance.protocols.imap import capabilities as imap_capabilities
from appliance.protocols.pop3 import Continuation, Multiline, format_command, parse_capa
from appliance.protocols.pop3 import ResponseReader as Pop3ResponseReader
from appliance.proxy.connection import Connection, ConnectionClosed
from appliance.proxy.resolver import RESOLVER
from appliance.proxy.upstream import AllAddressesFailed, connect_first

# Higher is stronger. A learned record moves only to a higher value on its own.
MODE_STRENGTH = {"none": 0, "starttls": 1, "implicit": 2}
# OpenSSL reasons for a peer that does not speak TLS at all, such as a plain IMAP
# greeting read as a TLS record. Other handshake failures mean the peer speaks TLS.
# NOTE: a peer that closes mid-handshake also counts as not speaking TLS. So on first
# contact, before any record exists, an attacker who can reset connections can hide
# implicit TLS, just as removing the capability hides STARTTLS.
NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
        "UNEXPECTED_EOF_WHILE_READING",
    }
)
MAX_LINE_LENGTH = 8192
MAX_LITERAL_SIZE = 65536


def mode_strength(mode: str) -> int:
    return MODE_STRENGTH[mode]


@dataclass(frozen=True)
class CertificateInfo:
    """The server's leaf certificate, as shown to an operator."""

    subject: str
    issuer: str
    not_after: datetime
    sha256: str
    """SHA-256 of the DER certificate, lower-case hex."""


@dataclass(frozen=True)
class ModeReport:
    """Outcome of probing one mode on the server."""

    mode: str
    port: int
    offered: bool
    usable: bool
    detail: str = ""
    """Reason the mode is not offered or not usable, empty when it is usable."""
    tls_version: str | None = None
    cipher: str | None = None
    certificate: CertificateInfo | None = None
    verified: bool | None = None
    """True when the chain and host name verified, False when they did not, None when
    verification was off or no certificate was seen."""
    reached: bool = False
    """A TCP connection to the port succeeded."""
    address: str | None = None
    """The server address that the connection reached, where it is known. A host name
    can have several, which are tried in order."""


@dataclass(frozen=True)
class ProbeReport:
    """The result of probing one server for one protocol."""

    protocol: str
    host: str
    port: int | None
    """The fixed port that both connections used, or None for the standard ports."""
    modes: tuple[ModeReport, ...]

    def mode(self, name: str) -> ModeReport:
        return next(report for report in self.modes if report.mode == name)

    @property
    def reachable(self) -> bool:
        """Whether any connection to the server succeeded."""
        return any(report.reached for report in self.modes)

    def chosen_mode(self) -> str | None:
        """Return the mode `tls: auto` records for this server, or None.

        The strongest usable TLS mode wins. Without one, the strongest offered TLS mode
        is still chosen, so that sessions fail closed instead of using plain text. Plain
        text is chosen only when the server showed no TLS at all.
        """
        tls_modes = [self.mode("implicit"), self.mode("starttls")]
        for report in tls_modes:
            if report.usable:
                return report.mode
        for report in tls_modes:
            if report.offered:
                return report.mode
        plain = self.mode("none")
        return "none" if plain.usable else None

    def chosen_mode_usable(self) -> bool:
        """Return whether sessions can use the chosen mode now.

        False when no mode is chosen.
        """
        chosen = self.chosen_mode()
        return chosen is not None and self.mode(chosen).usable

    def summary(self) -> str:
        """Return one line such as `implicit: TLSv1.3, verified; starttls: ...`."""
        return "; ".join(f"{report.mode}: {_describe(report)}" for report in self.modes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for mode in data["modes"]:
            certificate = mode["certificate"]
            if certificate is not None:
                certificate["not_after"] = certificate["not_after"].isoformat()
        data["chosen_mode"] = self.chosen_mode()
        data["chosen_mode_usable"] = self.chosen_mode_usable()
        return data


def _describe(report: ModeReport) -> str:
    if not report.offered:
        return f"{_not_offered(report)} ({report.detail})"
    if report.mode == "none":
        return (
            "offered" if report.usable else f"offered but not usable ({report.detail})"
        )
    parts = [report.tls_version or "TLS"]
    if report.verified is True:
        parts.append("verified")
    elif report.verified is None:
        parts.append("not verified (verification off)")
    if not report.usable:
        parts.append(f"not usable ({report.detail})")
    return ", ".join(parts)


@dataclass(frozen=True)
class ProbeSettings:
    """How to reach and check the server."""

    host: str
    protocol: str
    port: int | None
    context: ssl.SSLContext
    """Client context that decides verification, like a session's upstream context."""
    server_name: str
    timeout: float
    inspect_context: ssl.SSLContext | None = None
    """Non-verifying context for a second look at a certificate that failed
    verification, so its details can be shown; None skips the second look."""

    def port_for(self, mode: str) -> int:
        return self.port if self.port is not None else default_port(self.protocol, mode)


ProbeFunction = Callable[[ProbeSettings], Awaitable[ProbeReport]]


async def probe_server(settings: ProbeSettings) -> ProbeReport:
    """Probe implicit TLS and the plain port in parallel and report all three modes."""
    implicit_task = asyncio.create_task(_probe_implicit_with_inspection(settings))
    plain_task = asyncio.create_task(_probe_plain_port_with_inspection(settings))
    try:
        implicit = await implicit_task
        if settings.port is not None and implicit.offered:
            # A port that starts with TLS sends no plain greeting, so the plain-port
            # connection would only wait for its timeout.
            plain_task.cancel()
            starttls, plain = _skipped_plain_port(settings.port)
        else:
            starttls, plain = await plain_task
    finally:
        implicit_task.cancel()
        plain_task.cancel()
    report = ProbeReport(
        protocol=settings.protocol,
        host=settings.host,
        port=settings.port,
        modes=(implicit, starttls, plain),
    )
    if not report.reachable:
        # As after a session's failed connect, the next lookup finds a moved server.
        RESOLVER.forget(settings.host)
    return report


def _skipped_plain_port(port: int) -> tuple[ModeReport, ModeReport]:
    # The implicit TLS probe reached this port, so both modes read "not offered".
    detail = "the port speaks implicit TLS"
    return (
        ModeReport(
            "starttls", port, offered=False, usable=False, reached=True, detail=detail
        ),
        ModeReport(
            "none", port, offered=False, usable=False, reached=True, detail=detail
        ),
    )


async def _probe_implicit_with_inspection(settings: ProbeSettings) -> ModeReport:
    report = await _probe_implicit(settings, settings.context)
    if report.verified is not False or settings.inspect_context is None:
        return report
    inspected = await _probe_implicit(settings, settings.inspect_context)
    return _merge_inspection(report, inspected)


async def _probe_plain_port_with_inspection(
    settings: ProbeSettings,
) -> tuple[ModeReport, ModeReport]:
    starttls, plain = await _probe_plain_port(settings, settings.context)
    if starttls.verified is not False or settings.inspect_context is None:
        return starttls, plain
    inspected, _ = await _probe_plain_port(settings, settings.inspect_context)
    return _merge_inspection(starttls, inspected), plain


def _merge_inspection(failed: ModeReport, inspected: ModeReport) -> ModeReport:
    return replace(
        failed,
        tls_version=inspected.tls_version,
        cipher=inspected.cipher,
        certificate=inspected.certificate,
        address=failed.address or inspected.address,
    )


class _Probe:
    """One probe connection: a Connection plus the protocol's response reader."""

    def __init__(self, settings: ProbeSettings, connection: Connection) -> None:
        self.settings = settings
        self.connection = connection
        self.tags = iter(f"P{n}" for n in range(1, 100))
        if settings.protocol == "imap":
            self.reader: Any = ImapResponseReader(MAX_LINE_LENGTH, MAX_LITERAL_SIZE)
        else:
            self.reader = Pop3ResponseReader(MAX_LINE_LENGTH)

    async def next_event(self) -> Any:
        while True:
            event = self.reader.next_event()
            if event is not None:
                return event
            data = await self.connection.read_some()
            if not data:
                raise ConnectionClosed
            self.reader.feed(data)

    async def greeting(self) -> tuple[bool, str, list[str] | None]:
        """Read the greeting and return (usable OK, reason if not, capabilities if any)."""
        if self.settings.protocol == "pop3":
            self.reader.expect_status()
            event = await self.next_event()
            if isinstance(event, Continuation) or not event.status.ok:
                return False, "server greeting is not +OK", None
            return True, "", None
        response: ImapResponse = await self.next_event()
        if response.status == "PREAUTH":
            return (
                False,
                "server greeting is PREAUTH, which would skip login and TLS",
                None,
            )
        if response.kind != "untagged" or response.status != "OK":
            return False, f"server greeting is {response.status or 'invalid'}", None
        return True, "", imap_capabilities(response)

    async def capabilities(self) -> list[str]:
        if self.settings.protocol == "pop3":
            self.connection.send(format_command("CAPA"))
            self.reader.expect_multiline()
            event = await self.next_event()
            return parse_capa(event.lines) if isinstance(event, Multiline) else []
        tagged, untagged = await self.imap_command(b"CAPABILITY")
        for response in [*untagged, tagged]:
            caps = imap_capabilities(response)
            if caps:
                return caps
        return []

    async def imap_command(
        self, command: bytes
    ) -> tuple[ImapResponse, list[ImapResponse]]:
        tag = next(self.tags)
        self.connection.send(f"{tag} ".encode() + command + b"\r\n")
        untagged = []
        while True:
            response = await self.next_event()
            if response.kind == "tagged" and response.tag == tag:
                return response, untagged
            untagged.append(response)

    async def starttls_accepted(self) -> bool:
        if self.settings.protocol == "pop3":
            self.connection.send(format_command("STLS"))
            self.reader.expect_status()
            event = await self.next_event()
            accepted = not isinstance(event, Continuation) and event.status.ok
        else:
            tagged, _ = await self.imap_command(b"STARTTLS")
            accepted = tagged.status == "OK"
        # Plaintext after the STARTTLS reply could be injected, so it is dropped here.
        self.reader.take_buffered()
        return accepted

    def say_goodbye(self) -> None:
        if self.settings.protocol == "pop3":
            self.connection.send(format_command("QUIT"))
        else:
            self.connection.send(f"{next(self.tags)} LOGOUT\r\n".encode())


async def _connect(
    settings: ProbeSettings, port: int, context: ssl.SSLContext | None
) -> Connection:
    # Uses the resolver cache and address order of sessions, so a probe reaches the same
    # server as the sessions that use its result.
    deadline = asyncio.get_running_loop().time() + settings.timeout
    return await connect_first(
        settings.host,
        port,
        deadline,
        context=context,
        server_name=settings.server_name,
    )


async def _probe_implicit(
    settings: ProbeSettings, context: ssl.SSLContext
) -> ModeReport:
    port = settings.port_for("implicit")
    base = ModeReport("implicit", port, offered=False, usable=False)
    connection: Connection | None = None
    try:
        async with asyncio.timeout(settings.timeout):
            try:
                connection = await _connect(settings, port, context)
            except (ssl.SSLError, ConnectionError) as exc:
                return _handshake_failure(base, exc, reached=True)
            except AllAddressesFailed as exc:
                handshake = _failed_handshakes(exc)
                if not handshake:
                    raise
                return _handshake_failure(base, handshake[-1], reached=True)
            report = replace(
                base,
                offered=True,
                reached=True,
                address=_address_of(connection),
                **_tls_details(connection, context),
            )
            probe = _Probe(settings, connection)
            usable, reason = (await probe.greeting())[:2]
            probe.say_goodbye()
            return replace(report, usable=usable, detail=reason)
    except TimeoutError:
        return replace(base, detail="timed out", reached=connection is not None)
    except OSError as exc:
        return replace(base, detail=_os_error_text(exc))
    except (ConnectionClosed, UpstreamProtocolError) as exc:
        return _closed_after_handshake(base, connection, exc)
    finally:
        if connection is not None:
            connection.abort()


def _failed_handshakes(exc: AllAddressesFailed) -> list[OSError]:
    """Return the errors of addresses that accepted the TCP connection but broke off."""
    return [
        error
        for _, error in exc.errors
        if isinstance(error, (ConnectionResetError, ConnectionAbortedError))
    ]


def _closed_after_handshake(
    base: ModeReport, connection: Connection | None, exc: Exception
) -> ModeReport:
    reason = "connection closed" if isinstance(exc, ConnectionClosed) else str(exc)
    if connection is None:
        return replace(base, detail=reason)
    return replace(
        base, offered=True, reached=True, detail=f"after the handshake: {reason}"
    )


def _handshake_failure(
    base: ModeReport, exc: BaseException, *, reached: bool
) -> ModeReport:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"certificate verification failed: {exc.verify_message}"
        return replace(
            base, offered=True, reached=reached, verified=False, detail=detail
        )
    if isinstance(exc, ssl.SSLError) and exc.reason not in NOT_TLS_REASONS:
        detail = f"TLS handshake failed: {exc.reason or exc}"
        return replace(base, offered=True, reached=reached, detail=detail)
    if isinstance(exc, ConnectionRefusedError):
        return replace(base, detail="connection refused")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason
    else:
        reason = describe_error(exc, "server")
    return replace(
        base, reached=reached, detail=f"the port does not speak TLS ({reason})"
    )


async def _probe_plain_port(
    settings: ProbeSettings, context: ssl.SSLContext
) -> tuple[ModeReport, ModeReport]:
    port = settings.port_for("starttls")
    starttls = ModeReport("starttls", port, offered=False, usable=False)
    plain = ModeReport("none", port, offered=False, usable=False)
    connection: Connection | None = None
    try:
        async with asyncio.timeout(settings.timeout):
            connection = await _connect(settings, port, None)
            address = _address_of(connection)
            starttls = replace(starttls, reached=True, address=address)
            plain = replace(plain, reached=True, address=address)
            probe = _Probe(settings, connection)
            ok, reason, caps = await probe.greeting()
            if not ok:
                failed = replace(plain, detail=reason)
                return replace(starttls, detail=reason), failed
            caps = caps if caps is not None else await probe.capabilities()
            plain = _plain_report(plain, settings.protocol, caps)
            name = _starttls_name(settings.protocol)
            if not capability_lists.has_capability(caps, name):
                detail = f"{name} is not in the server's capabilities"
                return replace(starttls, detail=detail), plain
            # Offered from here on, whatever fails next, so plain text stays ruled out.
            starttls = replace(starttls, offered=True)
            return await _try_starttls(probe, starttls, context), plain
    except TimeoutError:
        detail = "timed out"
    except OSError as exc:
        detail = _os_error_text(exc)
    except (ConnectionClosed, UpstreamProtocolError) as exc:
        detail = "connection closed" if isinstance(exc, ConnectionClosed) else str(exc)
    finally:
        if connection is not None:
            connection.abort()
    if starttls.offered:
        return replace(starttls, usable=False, detail=detail), plain
    if plain.offered:
        return replace(starttls, detail=detail), plain
    return replace(starttls, detail=detail), replace(plain, detail=detail)


def _plain_report(plain: ModeReport, protocol: str, caps: list[str]) -> ModeReport:
    if protocol == "imap" and capability_lists.has_capability(caps, "LOGINDISABLED"):
        detail = "server advertises LOGINDISABLED on plain text"
        return replace(plain, offered=True, detail=detail)
    return replace(plain, offered=True, usable=True)


def _starttls_name(protocol: str) -> str:
    return "STLS" if protocol == "pop3" else "STARTTLS"


async def _try_starttls(
    probe: _Probe, report: ModeReport, context: ssl.SSLContext
) -> ModeReport:
    if not await probe.starttls_accepted():
        name = _starttls_name(probe.settings.protocol)
        return replace(report, detail=f"server rejected {name}")
    try:
        await probe.connection.start_tls(
            context,
            server_side=False,
            server_hostname=probe.settings.server_name,
            handshake_timeout=probe.settings.timeout,
        )
    except (ssl.SSLError, ConnectionError, ConnectionClosed) as exc:
        failed = _handshake_failure(report, exc, reached=True)
        return replace(failed, offered=True)
    probe.say_goodbye()
    return replace(report, usable=True, **_tls_details(probe.connection, context))


def _tls_details(connection: Connection, context: ssl.SSLContext) -> dict[str, Any]:
    ssl_object = connection.extra("ssl_object")
    if ssl_object is None:
        return {}
    cipher = ssl_object.cipher()
    der = ssl_object.getpeercert(binary_form=True)
    verifying = context.verify_mode == ssl.CERT_REQUIRED
    return {
        "tls_version": ssl_object.version(),
        "cipher": cipher[0] if cipher else None,
        "certificate": certificate_info(der) if der else None,
        "verified": True if verifying else None,
    }


def certificate_info(der: bytes) -> CertificateInfo:
    """Return subject, issuer, expiry and SHA-256 fingerprint of a DER certificate."""
    certificate = x509.load_der_x509_certificate(der)
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        not_after=certificate.not_valid_after_utc,
        sha256=hashlib.sha256(der).hexdigest(),
    )


def certificate_fingerprint(ssl_object: ssl.SSLObject | None) -> str | None:
    """Return the SHA-256 of the peer's DER certificate, or None without TLS."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def _address_of(connection: Connection) -> str | None:
    peer = connection.extra("peername")
    return str(peer[0]) if peer else None


def _os_error_text(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, AllAddressesFailed) and all(
        isinstance(error, ConnectionRefusedError) for _, error in exc.errors
    ):
        return "connection refused at " + ", ".join(a for a, _ in exc.errors)
    return f"connect failed: {describe_error(exc)}"


def probe_client_context(ca_file: str | None, *, verify: bool) -> ssl.SSLContext:
    """Build a client context like an upstream's: TLS 1.2 or newer, verifying by default.

    Raises OSError or ssl.SSLError when `ca_file` cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        # Opened without blocking and checked first, so a FIFO or device fails at once.
        with openssl_path(Path(ca_file)) as ca_path:
            context.load_verify_locations(cafile=ca_path)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def inspection_context() -> ssl.SSLContext:
    """Build a context that accepts any certificate, only to show its details."""
    return probe_client_context(None, verify=False)


def format_report(report: ProbeReport) -> str:
    """Return the probe report as text for an operator, one block per mode."""
    where = (
        "standard ports"
        if report.port is None
        else f"port {report.port} for every mode"
    )
    lines = [f"{report.protocol.upper()} server {report.host}, {where}"]
    for mode in report.modes:
        lines.extend(_format_mode(mode))
    chosen = report.chosen_mode()
    lines.append(f"tls: auto would record: {chosen or 'nothing (no mode reachable)'}")
    if chosen is not None and not report.chosen_mode_usable():
        # Recorded anyway, so that sessions fail closed instead of falling to plain text.
        detail = report.mode(chosen).detail
        lines.append(
            f"  not usable now ({detail}): sessions fail until the server or the "
            "appliance's TLS settings (ca_file, server_name, verify) are fixed"
        )
    return "\n".join(lines) + "\n"


def _not_offered(report: ModeReport) -> str:
    """Return "not reached" when no TCP connection succeeded, else "not offered"."""
    return "not offered" if report.reached else "not reached"


def _format_mode(report: ModeReport) -> list[str]:
    if report.offered:
        state = "offered, usable" if report.usable else "offered, not usable"
        if not report.usable:
            state += f": {report.detail}"
    else:
        state = f"{_not_offered(report)}: {report.detail}"
    lines = [f"{report.mode:<9} port {report.port:<5}  {state}"]
    if report.address is not None:
        lines.append(f"  address  {report.address}")
    if not report.offered:
        return lines
    if report.tls_version is not None:
        lines.append(f"  TLS version {report.tls_version}, cipher {report.cipher}")
    certificate = report.certificate
    if certificate is not None:
        expiry = certificate.not_after.strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(f"  subject  {certificate.subject}")
        lines.append(f"  issuer   {certificate.issuer}")
        lines.append(f"  expires  {expiry}")
        lines.append(f"  SHA-256  {certificate.sha256}")
    if report.mode != "none":
        verified = {True: "yes", False: "no", None: "not checked"}[report.verified]
        lines.append(f"  verified {verified}")
    return lines
