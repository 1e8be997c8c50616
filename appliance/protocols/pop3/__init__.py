"""Sans-IO POP3 for the AUTHORIZATION state, where the proxy reads both directions.

CommandReader parses client lines and ResponseReader parses server responses. After
login the session relays bytes and stops using these readers. Errors never quote the
received bytes, because they may contain a credential.
"""

from appliance.protocols.pop3.commands import (
    Command,
    CommandEvent,
    CommandReader,
    ContinuationLine,
)
from appliance.protocols.pop3.responses import (
    Continuation,
    Multiline,
    ResponseEvent,
    ResponseReader,
    Status,
    StatusResponse,
    greeting_timestamp,
    parse_capa,
    parse_status,
    sasl_mechanisms,
)
from appliance.protocols.pop3.wire import (
    format_command,
    format_continuation,
    format_err,
    format_multiline,
    format_ok,
)

__all__ = [
    "Command",
    "CommandEvent",
    "CommandReader",
    "Continuation",
    "ContinuationLine",
    "Multiline",
    "ResponseEvent",
    "ResponseReader",
    "Status",
    "StatusResponse",
    "format_command",
    "format_continuation",
    "format_err",
    "format_multiline",
    "format_ok",
    "greeting_timestamp",
    "parse_capa",
    "parse_status",
    "sasl_mechanisms",
]
