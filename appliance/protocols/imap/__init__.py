"""Sans-IO IMAP: command and response readers, and builders for the proxy's lines."""

from appliance.protocols.imap.commands import (
    Command,
    CommandReader,
    ContinuationLine,
    ContinuationRequest,
    Event,
    Literal8,
    LiteralRejected,
    LiteralTooLarge,
    Value,
    is_valid_tag,
)
from appliance.protocols.imap.responses import Response, ResponseReader, capabilities
from appliance.protocols.imap.wire import (
    astring,
    format_authenticate_plain,
    format_capability,
    format_continuation,
    format_id,
    format_login,
    format_tagged,
    format_untagged,
    replace_capability_code,
)

__all__ = [
    "Command",
    "CommandReader",
    "ContinuationLine",
    "ContinuationRequest",
    "Event",
    "Literal8",
    "LiteralRejected",
    "LiteralTooLarge",
    "Response",
    "ResponseReader",
    "Value",
    "astring",
    "capabilities",
    "format_authenticate_plain",
    "format_capability",
    "format_continuation",
    "format_id",
    "format_login",
    "format_tagged",
    "format_untagged",
    "is_valid_tag",
    "replace_capability_code",
]
