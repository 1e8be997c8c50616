"""Build the SSLContexts that listeners and upstreams use.

Contexts are built from the config before anything starts or changes, so a bad certificate,
key or CA file is reported with the field that named it and nothing running is touched.
"""

from __future__ import annotations

import collections
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import AppConfig, ListenerConfig, UpstreamConfig
from appliance.files import openssl_path
from appliance.tls import pem

# Sessions kept per upstream server name for resumption. The newest is offered first.
SESSIONS_PER_SERVER_NAME = 64
# Server names with stored sessions per context. Routing by login can reach many names,
# so the name stored longest ago is dropped beyond this.
MAX_SERVER_NAMES = 1024

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# Plain words for OpenSSL's reasons to reject a well-formed certificate under its
# security level, which the checks of the PEM files cannot find.
_SECURITY_LEVEL_PROBLEMS = {
    "EE_KEY_TOO_SMALL": (
        "contains a certificate whose key is too small for OpenSSL's security level; "
        "issue a new certificate with a larger key, such as RSA of 2048 bits or more, "
        "or an EC key"
    ),
    "CA_KEY_TOO_SMALL": (
        "contains a CA certificate whose key is too small for OpenSSL's security "
        "level; use a chain whose CA keys are RSA keys of at least 2048 bits or EC keys"
    ),
    "CA_MD_TOO_WEAK": (
        "contains a certificate signed with a hash that OpenSSL's security level "
        "rejects, such as SHA-1 or MD5; issue a new certificate signed with SHA-256"
    ),
}


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
        if upstream.ca_file is not None:
            _load_ca_file(context, upstream.ca_file, where)
        elif upstream.tls != "none":
            # Loading the system store took 35 ms here (Debian 12, 144 CAs) on every
            # start and reload, and a `tls: none` upstream never verifies anything.
            try:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            except (ssl.SSLError, OSError) as exc:
                raise TlsContextError([_ca_file_problem(exc, None, where)]) from None
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
    key_field = cert_field.replace("cert_file", "key_file")
    with contextlib.ExitStack() as opened:
        cert_path = _open_for_openssl(opened, cert_file, f"{where}.{cert_field}")
        key_path = _open_for_openssl(opened, key_file, f"{where}.{key_field}")
        problem = _load_opened_chain(
            context, cert_path, key_path, cert_file, key_file, where, cert_field
        )
    if problem is not None:
        raise TlsContextError([problem])


def _load_ca_file(context: ssl.SSLContext, ca_file: Path, where: str) -> None:
    with contextlib.ExitStack() as opened:
        ca_path = _open_for_openssl(opened, ca_file, f"{where}.ca_file")
        try:
            context.load_verify_locations(cafile=ca_path)
        except (ssl.SSLError, OSError) as exc:
            problem = _ca_file_problem(exc, ca_file, where)
            raise TlsContextError([problem]) from None


def _open_for_openssl(
    opened: contextlib.ExitStack, path: Path | None, field_name: str
) -> str | None:
    """Open `path` on the `opened` stack and return the path that OpenSSL should read.

    Raises TlsContextError naming `field_name` when the file is no regular file or
    cannot be opened, so that OpenSSL never opens a FIFO or device by its path.
    """
    try:
        return opened.enter_context(openssl_path(path))
    except OSError as exc:
        problem = pem.open_error_problem(path or Path(), exc)
        raise TlsContextError([f"{field_name}: {str(path)!r} {problem}"]) from None


def _load_opened_chain(
    context: ssl.SSLContext,
    cert_path: str | None,
    key_path: str | None,
    cert_file: Path | None,
    key_file: Path | None,
    where: str,
    cert_field: str,
) -> str | None:
    """Load the opened certificate chain and key; return a problem, or None."""
    # Without a key file, OpenSSL reads the key from the certificate file.
    key_field = cert_field.replace("cert_file", "key_file") if key_file else cert_field
    try:
        context.load_cert_chain(
            cert_path or str(cert_file),
            key_path,
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
        return None
    return problem


def _chain_problem(
    exc: ssl.SSLError | OSError,
    cert_file: Path | None,
    key_file: Path | None,
    where: str,
    cert_field: str,
) -> str:
    """Describe a failed certificate and key pair, naming the field of the file at fault.

    OpenSSL's reason for a broken PEM file is often only "PEM lib", so the files are
    checked again: the certificate file, then the key file, then whether the two match.
    """
    key_field = cert_field.replace("cert_file", "key_file")
    if cert_file is not None:
        problem = pem.certificate_file_problem(
            cert_file,
            expected="the certificate chain, leaf first",
            other_files=[key_file] if key_file else [],
        )
        if problem is not None:
            return f"{where}.{cert_field}: {str(cert_file)!r} {problem}"
    # Without a key file, OpenSSL reads the key from the certificate file.
    key_path, key_path_field = (
        (key_file, key_field) if key_file is not None else (cert_file, cert_field)
    )
    if key_path is not None:
        problem = pem.private_key_file_problem(
            key_path,
            expected=f"the unencrypted private key of {cert_field}",
            other_files=[cert_file] if cert_file else [],
        )
        if problem is not None:
            return f"{where}.{key_path_field}: {str(key_path)!r} {problem}"
    if cert_file is not None and key_file is not None:
        problem = pem.key_mismatch_problem(cert_file, key_file, cert_field, key_field)
        if problem is not None:
            return f"{where}.{cert_field}: {str(cert_file)!r} {problem}"
    rejected = (
        _SECURITY_LEVEL_PROBLEMS.get(exc.reason or "")
        if isinstance(exc, ssl.SSLError)
        else None
    )
    if rejected is not None:
        return f"{where}.{cert_field}: {str(cert_file)!r} {rejected}"
    return (
        f"{where}.{cert_field}: certificate {str(cert_file)!r} with key "
        f"{str(key_file)!r} could not be loaded ({pem.load_error_reason(exc)}); "
        "expected a PEM certificate chain and its matching unencrypted private key"
    )


def _ca_file_problem(
    exc: ssl.SSLError | OSError, ca_file: Path | None, where: str
) -> str:
    """Describe why the CA certificates of an upstream could not be loaded."""
    if ca_file is None:
        return (
            f"{where}: the system's CA certificates could not be loaded "
            f"({pem.load_error_reason(exc)}); set {where}.ca_file to a PEM file of CA "
            "certificates"
        )
    expected = "one or more PEM CA certificates"
    problem = pem.certificate_file_problem(ca_file, expected=expected)
    if problem is None:
        problem = (
            f"contains no usable CA certificate ({pem.load_error_reason(exc)}); "
            f"expected {expected}"
        )
    return f"{where}.ca_file: {str(ca_file)!r} {problem}"
