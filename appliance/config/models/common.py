"""Field types, host and address checks, and the base model of every config section."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from appliance.files import special_file_kind

Protocol = Literal["imap", "pop3"]
ListenerTls = Literal["none", "implicit", "starttls"]
UpstreamTls = Literal["none", "implicit", "starttls", "auto"]
ClientAddressMode = Literal["none", "proxy_v2", "imap_id"]
LoginSeparator = Literal["@", "#", "%"]
KnownMode = Literal["implicit", "starttls", "none"]


def _tls_version_text(value: object) -> object:
    """Read an unquoted YAML or TOML `1.3`, which arrives as a number, as "1.3"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{value:.1f}"
        if text in ("1.2", "1.3"):
            return text
    return value


def _check_number(value: object) -> object:
    """Reject a boolean or NaN where a number is expected.

    pydantic's lax mode reads true and false as 1 and 0, so `connect_timeout: true` would
    become a one-second timeout. NaN fails every bound, because every comparison with it
    is false, so it is rejected here with its own message instead of a bound's. Other
    strings pass on, so env values such as "30" still work.
    """
    if isinstance(value, bool):
        raise ValueError(
            f"value {str(value).lower()} is a boolean, but a number is expected; "
            "YAML also reads yes, no, on and off as booleans"
        )
    if _is_nan(value):
        raise ValueError(
            f"value {value!r} is not a number (NaN); expected a number such as 30"
        )
    return value


def _is_nan(value: object) -> bool:
    """Return whether a config value is NaN, or a string that float() reads as NaN."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and math.isnan(value)


# Validator of every numeric field. It goes after the `Field` bounds, because placed
# before them it turns the bounds into `ge` and `le` keys that JSON Schema does not know.
NUMBER_CHECK = BeforeValidator(_check_number)

TlsVersion = Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version_text)]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"]
LOG_LEVELS = get_args(LogLevel)
Port = Annotated[int, Field(ge=1, le=65535), NUMBER_CHECK]

# Upper bounds of durations in seconds. Every duration has one, so that a typo such as
# `.inf` or 1e308 cannot switch a timeout off or overflow a deadline. NUMBER_CHECK
# rejects NaN before the bounds are checked.
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY

Seconds = Annotated[float, Field(gt=0, le=HOUR), NUMBER_CHECK]
"""A duration of one network step or one delay: above 0, at most an hour."""

LongSeconds = Annotated[float, Field(gt=0, le=DAY), NUMBER_CHECK]
"""A duration that a session or a client address may last: above 0, at most a day."""

# Ports from RFC 3501/1939 (plain, STARTTLS) and RFC 8314 (implicit TLS).
DEFAULT_PORTS: dict[tuple[str, str], int] = {
    ("imap", "plain"): 143,
    ("imap", "implicit"): 993,
    ("pop3", "plain"): 110,
    ("pop3", "implicit"): 995,
}

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def default_port(protocol: str, tls: str) -> int:
    """Return the standard port for a protocol and upstream TLS mode."""
    kind = "implicit" if tls == "implicit" else "plain"
    return DEFAULT_PORTS[(protocol, kind)]


def normalize_host(value: str) -> str:
    """Validate a host name or IP address and return it lower-cased without a final dot."""
    host = value.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOSTNAME_LABEL.match(x) for x in labels):
        raise ValueError(
            f"{value!r} is not a valid host name or IP address; "
            "expected a name such as mail.example.org or an address such as 192.0.2.10"
        )
    return host


def is_host_name(value: str) -> bool:
    """Return whether `value` is a DNS host name and not an IP address in any spelling.

    A final label of digits only is refused as well, because resolvers read names such
    as `127.1` or `2130706433` as IPv4 addresses.
    """
    labels = value.split(".")
    if not value or len(value) > 253:
        return False
    if not all(_HOSTNAME_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()


def normalize_route_host(value: str) -> str:
    """Validate a routing host, which is a host name or `*.` and a host name.

    Returns the host lower-cased without a final dot.
    """
    host = value.strip().rstrip(".").lower()
    name = host[2:] if host.startswith("*.") else host
    if not is_host_name(name):
        raise ValueError(
            f"{value!r} is not a host name or pattern; expected a name such as "
            "mail.example.org or a pattern such as *.example.org, where * stands for "
            "one label (IP addresses are not allowed)"
        )
    return host


def normalize_bind(value: str) -> str:
    """Validate a bind address, an IP address optionally in brackets, and normalize it."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address; expected an address such as "
            "127.0.0.1, 0.0.0.0, ::1 or ::"
        ) from None


def _check_readable(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.exists():
        raise ValueError(f"file {str(path)!r} does not exist; expected a readable PEM file")
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a directory, not a regular file; set the path of the PEM "
            "file inside it"
        )
    if not path.is_file():
        try:
            kind = special_file_kind(path.stat().st_mode)
        except OSError:
            kind = "a special file"
        raise ValueError(
            f"{str(path)!r} is not a regular file but {kind}; expected a PEM file"
        )
    if not os.access(path, os.R_OK):
        raise ValueError(
            f"file {str(path)!r} is not readable by this process; give the user that "
            "runs the appliance read access to it"
        )
    return path


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
