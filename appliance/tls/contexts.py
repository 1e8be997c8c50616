"""Build the SSLContexts that listeners and upstreams use.

Contexts are built from the config before anything starts or changes, so a bad certificate,
key or CA file is reported with the field that named it and nothing running is touched.
"""

from __future__ import annotations

import collections
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import AppConfig, ListenerConfig, UpstreamConfig

# Sessions kept per upstream server name for resumption. The newest is offered first.
SESSIONS_PER_SERVER_NAME = 64
# Server names with stored sessions per context. Routing by login can reach many names,
# so the name stored longest ago is dropped beyond this.
MAX_SERVER_NAMES = 1024

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# Bytes of a PEM file read to tell which file of a certificate and key pair failed to
# load. A certificate chain takes a few kB, so the limit only guards against huge files.
MAX_PEM_PREVIEW = 1 << 20
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----")
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


class TlsContextError(Exception):
    """Failure to build TLS contexts, with one line in `problems` per failing config field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class TlsContexts:
    listeners: dict[str, ssl.SSLContext] = field(default_factory=dict)
    """Server-side context per TLS listener; listeners with `tls: none` have none."""
    upstreams: dict[str, UpstreamContext] = field(default_factory=dict)
    """Client-side context per upstream, used for implicit TLS and STARTTLS alike."""


def server_context(listener: ListenerConfig, where: str) -> ssl.SSLContext:
    """Build the context that a TLS listener presents to mail clients."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[listener.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _load_chain(context, listener.cert_file, listener.key_file, where, "cert_file")
    return context


class UpstreamContext(ssl.SSLContext):
    """A client-side context that resumes TLS sessions of earlier connections.

    Resuming skips the server's signature and the certificate checks. Only sessions from
    handshakes made with this context, and so verified under its policy, are offered
    again, and only to the server name they were verified for. Each session is offered
    once (RFC 8446, appendix C.4), so concurrent connections never share a ticket. A
    reload builds new contexts, so changed CA files or verification settings start with
    no sessions.
    """

    resume_sessions: bool
    _sessions: dict[str, collections.deque[ssl.SSLSession]]

    def __new__(cls, *, resume_sessions: bool = True) -> UpstreamContext:
        context = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        context.resume_sessions = resume_sessions
        context._sessions = {}
        return context

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        # asyncio and uvloop both create their TLS objects through this method.
        if session is None and self.resume_sessions and server_hostname is not None:
            stored = self._sessions.get(server_hostname)
            if stored:
                session = stored.pop()
                if not stored:
                    del self._sessions[server_hostname]
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session
        )

    def remember_session(self, ssl_object: ssl.SSLObject) -> None:
        """Keep the connection's session for a later connection to the same name.

        Call it once the server has accepted a login: by then a TLS 1.3 server has sent
        its session tickets, which arrive after the handshake.
        """
        name = ssl_object.server_hostname
        if not self.resume_sessions or name is None:
            return
        session = ssl_object.session
        if session is not None and (session.has_ticket or session.id):
            stored = self._sessions.get(name)
            if stored is None:
                if len(self._sessions) >= MAX_SERVER_NAMES:
                    del self._sessions[next(iter(self._sessions))]
                stored = self._sessions[name] = collections.deque(
                    maxlen=SESSIONS_PER_SERVER_NAME
                )
            stored.append(session)

    def session_count(self, server_hostname: str) -> int:
        return len(self._sessions.get(server_hostname, ()))


def client_context(upstream: UpstreamConfig, where: str) -> UpstreamContext:
    """Build the context for connections to an upstream, verifying by default."""
    context = UpstreamContext(resume_sessions=upstream.session_resumption)
    context.minimum_version = TLS_VERSIONS[upstream.min_version]
    context.options |= ssl.OP_NO_COMPRESSION
    if upstream.verify:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            if upstream.ca_file is not None:
                context.load_verify_locations(cafile=str(upstream.ca_file))
            elif upstream.tls != "none":
                # Loading the system store took 35 ms here (Debian 12, 144 CAs) on every
                # start and reload, and a `tls: none` upstream never verifies anything.
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (ssl.SSLError, OSError) as exc:
            found = _pem_kind_found(upstream.ca_file, expected="certificate")
            problem = (
                f"{where}.ca_file: {str(upstream.ca_file)!r} contains no usable CA "
                f"certificate{found} ({_reason(exc)}); expected PEM certificates"
            )
            raise TlsContextError([problem]) from None
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if upstream.client_cert_file is not None:
        _load_chain(
            context,
            upstream.client_cert_file,
            upstream.client_key_file,
            where,
            "client_cert_file",
        )
    return context


def build_all_contexts(config: AppConfig) -> TlsContexts:
    """Build every context the config needs.

    Raises TlsContextError with a problem for every listener and upstream whose context
    fails, so that one check-config run reports all of them. Upstreams with the same TLS
    settings share one context, because loading the system CA store takes about 35 ms
    per context, which a config with many upstreams pays on every start and reload.
    """
    contexts = TlsContexts()
    problems: list[str] = []
    for name, listener in config.listeners.items():
        if listener.tls == "none":
            continue
        try:
            contexts.listeners[name] = server_context(listener, f"listeners.{name}")
        except TlsContextError as exc:
            problems.extend(exc.problems)
    shared: dict[tuple[object, ...], UpstreamContext] = {}
    for name, upstream in config.upstreams.items():
        key = client_context_key(upstream)
        context = shared.get(key)
        if context is None:
            # A failed key is not stored, so each upstream that shares it is named.
            try:
                context = client_context(upstream, f"upstreams.{name}")
            except TlsContextError as exc:
                problems.extend(exc.problems)
                continue
            shared[key] = context
        contexts.upstreams[name] = context
    if problems:
        raise TlsContextError(problems)
    return contexts


def client_context_key(upstream: UpstreamConfig) -> tuple[object, ...]:
    """Return every setting that `client_context` reads; keep the two in step."""
    return (
        upstream.tls == "none",
        upstream.verify,
        upstream.ca_file,
        upstream.min_version,
        upstream.client_cert_file,
        upstream.client_key_file,
        upstream.session_resumption,
    )


class _EncryptedKeyError(Exception):
    """Raised by the password callback, because the config has no key password."""


def _reject_password_request() -> bytes:
    # Without a callback, OpenSSL prompts for the password on the terminal, which blocks
    # check-config, a start or a reload until someone types it.
    raise _EncryptedKeyError


def _load_chain(
    context: ssl.SSLContext,
    cert_file: Path | None,
    key_file: Path | None,
    where: str,
    cert_field: str,
) -> None:
    # Without a key file, OpenSSL reads the key from the certificate file.
    key_field = cert_field.replace("cert_file", "key_file") if key_file else cert_field
    try:
        context.load_cert_chain(
            str(cert_file),
            str(key_file) if key_file else None,
            password=_reject_password_request,
        )
    except _EncryptedKeyError:
        problem = (
            f"{where}.{key_field}: {str(key_file or cert_file)!r} contains an encrypted "
            "private key, and the appliance takes no key password; decrypt it, such as "
            "with 'openssl pkey -in KEY -out KEY.plain', and make the result readable "
            "only by this process"
        )
    except (ssl.SSLError, OSError) as exc:
        problem = _chain_problem(exc, cert_file, key_file, where, cert_field)
    else:
        return
    raise TlsContextError([problem])


def _chain_problem(
    exc: ssl.SSLError | OSError,
    cert_file: Path | None,
    key_file: Path | None,
    where: str,
    cert_field: str,
) -> str:
    """Describe a failed certificate and key pair, naming the field of the file at fault.

    OpenSSL's reason for either file that lacks its PEM block is only "PEM lib", so the
    files are searched for the expected PEM headers.
    """
    key_field = cert_field.replace("cert_file", "key_file")
    cert_text = _pem_preview(cert_file)
    if cert_text is not None and not _PEM_CERTIFICATE.search(cert_text):
        found = _pem_kind_found(cert_file, expected="certificate")
        return (
            f"{where}.{cert_field}: {str(cert_file)!r} contains no PEM certificate"
            f"{found}; expected the certificate chain, leaf first"
        )
    key_text = _pem_preview(key_file)
    if key_text is not None and not _PEM_PRIVATE_KEY.search(key_text):
        found = _pem_kind_found(key_file, expected="private key")
        return (
            f"{where}.{key_field}: {str(key_file)!r} contains no PEM private key{found}; "
            f"expected the unencrypted private key of {cert_field}"
        )
    return (
        f"{where}.{cert_field}: certificate {str(cert_file)!r} with key "
        f"{str(key_file)!r} could not be loaded ({_reason(exc)}); expected a PEM "
        "certificate chain and its matching unencrypted private key"
    )


def _pem_preview(path: Path | None) -> bytes | None:
    """Return the start of a PEM file, or None when there is none or it cannot be read."""
    if path is None:
        return None
    try:
        with path.open("rb") as stream:
            return stream.read(MAX_PEM_PREVIEW)
    except OSError:
        return None


def _pem_kind_found(path: Path | None, expected: str) -> str:
    """Return " but a certificate" or " but a private key" for a file that contains that
    PEM block instead of `expected`, else an empty string."""
    text = _pem_preview(path)
    if text is None:
        return ""
    if expected != "certificate" and _PEM_CERTIFICATE.search(text):
        return " but a certificate"
    if expected != "private key" and _PEM_PRIVATE_KEY.search(text):
        return " but a private key"
    return ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return (
        exc.strerror
        if isinstance(exc, OSError) and exc.strerror
        else type(exc).__name__
    )
