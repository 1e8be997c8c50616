"""Timeouts and size limits."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from appliance.config.models.common import (
    DAY,
    HOUR,
    NUMBER_CHECK,
    WEEK,
    LongSeconds,
    Seconds,
    StrictModel,
)


class Limits(StrictModel):
    """Timeouts and size limits that bound what one client can cost."""

    connect_timeout: Seconds = 10.0
    """Seconds allowed for connecting to an upstream, TLS handshake included."""

    pre_auth_timeout: Seconds = 60.0
    """Seconds a client may take from connecting to a successful login."""

    login_reply_timeout: Seconds = 30.0
    """Seconds that a login forwarded to the mail server may wait for the server's
    reply, even past `pre_auth_timeout`, which it extends by at most this much. Mail
    servers delay a rejected login on purpose, and a login that the pre-auth timeout cut
    off would be logged as `unavailable`, which fail2ban does not count."""

    idle_timeout: Annotated[float, Field(ge=1800, le=DAY), NUMBER_CHECK] = 1860.0
    """Seconds without traffic after which an authenticated session is closed; at least
    1800, because RFC 3501 lets IMAP clients sit in IDLE for 30 minutes, and at most a
    day."""

    max_line_length: Annotated[int, Field(ge=512, le=1 << 20), NUMBER_CHECK] = 8192
    """Maximum length in bytes of one command or response line before login."""

    max_literal_size: Annotated[int, Field(ge=0, le=1 << 24), NUMBER_CHECK] = 65536
    """Maximum size in bytes of one IMAP literal before login. 0 rejects every literal
    but the empty `{0}`, so clients must send LOGIN arguments as quoted strings or use
    AUTHENTICATE."""

    max_connections: Annotated[int, Field(ge=1), NUMBER_CHECK] = 1000
    """Maximum concurrent sessions on one listener."""

    max_protocol_errors: Annotated[int, Field(ge=1), NUMBER_CHECK] = 10
    """Invalid commands, rejected logins and SASL exchanges cancelled with `*` after
    which a session that has not logged in is closed. A rejected login is one that the
    appliance does not forward, such as one before STARTTLS or with an unsupported SASL
    mechanism."""

    max_connections_per_address: Annotated[int, Field(ge=1), NUMBER_CHECK] = 50
    """Maximum concurrent sessions from one client address, over all listeners, so
    that a flood from one address cannot take every session or every upstream login
    process. Clients behind one NAT share an address, so raise it for such sites.
    Without PROXY protocol, every client behind a load balancer has its address."""

    ipv6_prefix_length: Annotated[int, Field(ge=32, le=128), NUMBER_CHECK] = 64
    """Length of the IPv6 prefix that counts as one client address for
    `max_connections_per_address` and the failed-login delay, because one host
    usually gets a whole /64. 128 counts every IPv6 address alone."""

    auth_failure_delay: Annotated[float, Field(ge=0, le=HOUR), NUMBER_CHECK] = 1.0
    """Seconds that the next login from a client address waits after an
    authentication failure from it. The delay doubles with each further failure, up to
    `auth_failure_delay_max`, and a successful login resets it. Logins from the address
    that arrive together wait in turn, each one delay after the one before. Syntax
    errors do not count. 0 turns the delay off."""

    auth_failure_delay_max: Seconds = 15.0
    """Upper bound in seconds of the failed-login delay."""

    auth_failure_reset_after: LongSeconds = 900.0
    """Seconds without an authentication failure after which the failures of a client
    address are forgotten."""

    shutdown_grace_period: Annotated[float, Field(ge=0, le=DAY), NUMBER_CHECK] = 8.0
    """Seconds that running sessions get to finish after SIGTERM or SIGINT. The default
    ends within the 10 s that `docker stop` and `podman stop` wait before SIGKILL."""

    drain_removed_listeners_after: (
        Annotated[float, Field(gt=0, le=WEEK), NUMBER_CHECK] | None
    ) = None
    """Seconds that sessions on a listener removed by a reload may go on before they are
    closed as at shutdown; unset lets them run to their natural end."""

    @model_validator(mode="after")
    def _validate_auth_failure_delay(self) -> Limits:
        if self.auth_failure_delay > self.auth_failure_delay_max:
            raise ValueError(
                f"auth_failure_delay ({self.auth_failure_delay}) is larger than "
                f"auth_failure_delay_max ({self.auth_failure_delay_max}); lower the "
                "first or raise the second"
            )
        return self
