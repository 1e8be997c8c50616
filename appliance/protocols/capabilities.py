"""The one place where the capabilities a client sees are decided.

Before login the client sees only what the proxy itself handles: the upstream's
capabilities filtered through an allow-list, plus STARTTLS/STLS, LOGINDISABLED and the SASL
mechanisms that this listener and session state call for. After login the upstream's list
passes through, less STARTTLS and LOGINDISABLED, which describe the proxy's client side and
not the upstream's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# IMAP capabilities safe to show before login: the proxy parses these commands itself
# (SASL-IR, ID, LITERAL+/-) or they only matter after login (ENABLE, IDLE), where the
# upstream handles them through the relay.
IMAP_PRE_AUTH_ALLOWED = frozenset(
    {"IMAP4REV1", "IMAP4REV2", "SASL-IR", "ID", "LITERAL+", "LITERAL-", "ENABLE", "IDLE"}
)
IMAP_POST_AUTH_REMOVED = frozenset({"STARTTLS", "LOGINDISABLED"})

# POP3 CAPA tags (RFC 2449) safe before login; the proxy handles USER, SASL and STLS itself.
POP3_PRE_AUTH_ALLOWED = frozenset(
    {
        "TOP",
        "UIDL",
        "RESP-CODES",
        "AUTH-RESP-CODE",
        "PIPELINING",
        "EXPIRE",
        "LOGIN-DELAY",
        "IMPLEMENTATION",
        "UTF8",
    }
)

# SASL mechanisms the proxy accepts from clients (RFC 4616 PLAIN and the LOGIN mechanism).
PROXY_SASL_MECHANISMS = ("PLAIN", "LOGIN")

# Capabilities that a listener which routes by login shows in place of an upstream's
# list, because it chooses the upstream only at login. They name only what the proxy's
# own parser and replies support.
ROUTING_IMAP_BASE = ("IMAP4rev1", "SASL-IR", "ID", "LITERAL+")
ROUTING_POP3_BASE = ("RESP-CODES", "AUTH-RESP-CODE")


@dataclass(frozen=True)
class ClientSideState:
    """What decides the pre-login capabilities: the listener and the session's TLS state."""

    offers_starttls: bool
    """The listener is `starttls`, so STARTTLS/STLS is offered until the upgrade."""
    tls_active: bool
    """The client connection is protected by TLS."""
    allow_plaintext_login: bool

    @property
    def login_allowed(self) -> bool:
        return self.tls_active or self.allow_plaintext_login or not self.offers_starttls

    @property
    def starttls_available(self) -> bool:
        return self.offers_starttls and not self.tls_active


def imap_pre_auth(upstream: Iterable[str], state: ClientSideState) -> list[str]:
    """Return the IMAP capabilities shown before login."""
    kept = [cap for cap in upstream if cap.upper() in IMAP_PRE_AUTH_ALLOWED]
    if not any(cap.upper() in ("IMAP4REV1", "IMAP4REV2") for cap in kept):
        kept.insert(0, "IMAP4rev1")
    if state.starttls_available:
        kept.append("STARTTLS")
    if state.login_allowed:
        if not any(cap.upper() == "SASL-IR" for cap in kept):
            kept.append("SASL-IR")
        kept.extend(f"AUTH={mechanism}" for mechanism in PROXY_SASL_MECHANISMS)
    else:
        kept = [cap for cap in kept if cap.upper() != "SASL-IR"]
        kept.append("LOGINDISABLED")
    return kept


def imap_post_auth(upstream: Iterable[str]) -> list[str]:
    """Return the IMAP capabilities shown after login."""
    return [cap for cap in upstream if cap.upper() not in IMAP_POST_AUTH_REMOVED]


def pop3_pre_auth(upstream: Iterable[str], state: ClientSideState) -> list[str]:
    """Return the POP3 CAPA lines shown before login."""
    kept = [line for line in upstream if _pop3_tag(line) in POP3_PRE_AUTH_ALLOWED]
    if state.starttls_available:
        kept.append("STLS")
    if state.login_allowed:
        kept.append("USER")
        kept.append("SASL " + " ".join(PROXY_SASL_MECHANISMS))
    return kept


def _pop3_tag(line: str) -> str:
    return line.split(" ", 1)[0].upper()


def has_capability(capabilities: Iterable[str], name: str) -> bool:
    """Return whether an IMAP capability or POP3 CAPA tag is present, ignoring case."""
    wanted = name.upper()
    return any(_pop3_tag(cap) == wanted for cap in capabilities)
