"""IMAP before login (RFC 3501/9051 not-authenticated state), answered by the proxy.

The proxy answers CAPABILITY, NOOP, ID, LOGOUT and STARTTLS itself and turns LOGIN and
AUTHENTICATE (PLAIN, LOGIN) into a fresh login toward the upstream, built from the parsed
credentials and never from the client's raw bytes. The upstream's tagged reply goes back
under the client's tag.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from appliance.logs import RepeatLimiter
from appliance.protocols import capabilities, sasl
from appliance.protocols.errors import ClientProtocolError, UpstreamProtocolError
from appliance.protocols.imap import (
    Command,
    ContinuationLine,
    ContinuationRequest,
    CommandReader,
    Literal8,
    LiteralRejected,
    LiteralTooLarge,
    Response,
    ResponseReader,
    format_authenticate_plain,
    format_capability,
    format_id,
    format_login,
    format_tagged,
    format_untagged,
    replace_capability_code,
)
from appliance.protocols.imap import capabilities as response_capabilities
from appliance.proxy.errors import UpstreamError
from appliance.proxy.session import (
    CLIENT_FAULTS,
    GOODBYE_TEXTS,
    LOGIN_SIZE_ERROR,
    MAX_LOGIN_PASSWORD_SIZE,
    MAX_LOGIN_USER_SIZE,
    MAX_SASL_RESPONSE_SIZE,
    Session,
    decode_login,
    refused_login_result,
)
from appliance.proxy.upstream import UpstreamTarget, open_upstream, upgrade_upstream

# Every session to an upstream with `send_client_address: imap_id` that does not offer
# ID, or rejects it, would repeat the warning. So each goes out once per upstream name
# and interval, and the repeats are logged at DEBUG. The servers of one host rule share
# the name of its template upstream, and so one limit.
UPSTREAM_ID_WARNING_INTERVAL = 300.0
UPSTREAM_ID_WARNINGS = RepeatLimiter(UPSTREAM_ID_WARNING_INTERVAL)

# LOGIN and SASL arguments are strings, while a literal8 carries binary data (RFC 3516).
LITERAL8_LOGIN_ERROR = "Login arguments are strings; literal8 (~{n}) is for binary data"
# Commands that the proxy replies to itself and whose grammar has no arguments (RFC 3501
# and RFC 9051).
COMMANDS_WITHOUT_ARGUMENTS = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"})
# Largest literal, by argument position, that a login may announce. A larger one is
# rejected before the client sends it, and so is any literal that the command cannot
# use. That is the AUTHENTICATE mechanism name (None, because RFC 3501 makes it an
# atom), an argument after the last position, and a literal inside or after a
# parenthesized list. The AUTHENTICATE initial response may be a whole PLAIN response.
# The keys are the commands whose literals may carry credentials.
LOGIN_LITERAL_LIMITS: dict[str, tuple[int | None, ...]] = {
    "LOGIN": (MAX_LOGIN_USER_SIZE, MAX_LOGIN_PASSWORD_SIZE),
    "AUTHENTICATE": (None, MAX_SASL_RESPONSE_SIZE),
}


class _Cancelled(Exception):
    """The client cancelled an AUTHENTICATE exchange with `*`."""


class ImapSession(Session):
    protocol = "imap"
    pre_auth_state = ("commands", "responses", "tags", "greeting", "upstream_caps")

    def goodbye(self, kind: str) -> bytes:
        # UNAVAILABLE (RFC 5530): the failure is temporary, so the client retries later.
        code = None if kind in CLIENT_FAULTS else "UNAVAILABLE"
        text = GOODBYE_TEXTS[kind]
        return format_untagged("BYE", text, code)

    # Upstream setup

    async def _setup_upstream(self, target: UpstreamTarget) -> None:
        self.upstream = await open_upstream(
            target,
            self.limits.connect_timeout,
            self.upstream_preface(target),
            log=self.log,
        )
        self.responses = ResponseReader(
            max_line_length=self.limits.max_line_length,
            max_literal_size=self.limits.max_literal_size,
        )
        self.tags = (f"P{n}" for n in itertools.count(1))
        greeting = await self.next_upstream_event(self.responses)
        self._check_greeting(greeting, target)
        self.greeting = greeting
        caps = response_capabilities(greeting) or await self._capability()
        offered = capabilities.has_capability(caps, "STARTTLS")
        if target.mode == "starttls" and not offered:
            raise UpstreamError(
                "starttls", f"{target.address}: server does not offer STARTTLS"
            )
        if target.mode == "starttls" or (target.starttls_if_offered and offered):
            tagged, _ = await self._command(b"STARTTLS")
            if tagged.status != "OK":
                raise UpstreamError("starttls", f"{target.address}: server rejected STARTTLS")
            self.check_no_pending(self.responses, "STARTTLS")
            await upgrade_upstream(self.upstream, target, self.limits.connect_timeout)
            caps = await self._capability()
        self.upstream_caps = caps
        if self.upstream_config(target).send_client_address == "imap_id":
            await self._send_client_id(target)

    async def _send_client_id(self, target: UpstreamTarget) -> None:
        """Send the client's address in the ID fields that Dovecot reads from
        `login_trusted_networks`: `x-originating-ip` and `x-originating-port`."""
        if not capabilities.has_capability(self.upstream_caps, "ID"):
            self.warn_limited(
                UPSTREAM_ID_WARNINGS,
                (target.name, "missing"),
                "upstream {} ({}) does not offer ID, so the client address is not sent. "
                "Set its send_client_address to proxy_v2, or to none",
                target.name,
                target.address,
            )
            return
        tag = next(self.tags)
        assert self.upstream is not None
        self.upstream.send(
            format_id(
                tag,
                {
                    "x-originating-ip": self.client_ip,
                    "x-originating-port": self.client_port,
                },
            )
        )
        tagged, _ = await self._tagged_reply(tag)
        if tagged.status != "OK":
            self.warn_limited(
                UPSTREAM_ID_WARNINGS,
                (target.name, "rejected"),
                "upstream {} ({}) responded {} to the ID command with the client address",
                target.name,
                target.address,
                tagged.status,
            )

    @staticmethod
    def _check_greeting(greeting: Response, target: UpstreamTarget) -> None:
        if greeting.kind == "untagged" and greeting.status == "OK":
            return
        if greeting.status == "PREAUTH":
            raise UpstreamError(
                "preauth",
                f"{target.address}: server greeting is PREAUTH, which would skip login and TLS",
            )
        raise UpstreamError(
            "greeting", f"{target.address}: server greeting is {greeting.status or 'invalid'}"
        )

    async def _command(self, command: bytes) -> tuple[Response, list[Response]]:
        """Send one proxy command and return its tagged response and untagged data."""
        assert self.upstream is not None
        tag = next(self.tags)
        self.upstream.send(tag.encode() + b" " + command + b"\r\n")
        return await self._tagged_reply(tag)

    async def _tagged_reply(self, tag: str) -> tuple[Response, list[Response]]:
        untagged = []
        while True:
            response = await self.next_upstream_event(self.responses)
            if _is_reply_to(response, tag):
                return response, untagged
            if response.kind == "untagged" and response.status == "BYE":
                raise UpstreamError("closed", "server sent BYE during setup")
            untagged.append(response)

    async def _capability(self) -> list[str]:
        tagged, untagged = await self._command(b"CAPABILITY")
        for response in [*untagged, tagged]:
            caps = response_capabilities(response)
            if caps:
                return caps
        raise UpstreamProtocolError("server sent no CAPABILITY list")

    # Client side

    async def pre_auth(self) -> bool:
        self.commands = CommandReader(
            max_line_length=self.limits.max_line_length,
            max_literal_size=self.limits.max_literal_size,
            argument_literal_limits=LOGIN_LITERAL_LIMITS,
        )
        if self.routes_by_login:
            # The upstream is chosen at login, so the proxy greets on its own.
            greeting_text = "IMAP proxy ready"
        else:
            await self.connect_upstream(self._setup_upstream)
            greeting_text = self.greeting.text
        pre_auth_caps = self._pre_auth_caps()
        self.client.send(
            format_untagged(
                "OK", greeting_text, "CAPABILITY " + " ".join(pre_auth_caps)
            )
        )
        while True:
            try:
                event = await self.next_client_event(self.commands)
            except LiteralTooLarge as exc:
                self._reject_oversized_literal(exc)
                continue
            except ClientProtocolError as exc:
                self._protocol_error(exc.message, exc.tag, fatal=exc.fatal)
                if isinstance(exc, LiteralRejected):
                    # No valid command before login needs a literal that the reader
                    # rejects, so closing costs a working client nothing.
                    self._close_after_rejected_literal()
                continue
            if isinstance(event, ContinuationRequest):
                self._answer_literal(event)
                continue
            if isinstance(event, ContinuationLine):
                self._protocol_error("Unexpected continuation line", None)
                continue
            result = await self._dispatch(event)
            if result is not None:
                return result

    def _answer_literal(self, request: ContinuationRequest) -> None:
        # "+" would invite a client that ignores LOGINDISABLED to send its password in
        # plain text, so a login that must wait for TLS is refused before the literal.
        is_login = request.name in ("LOGIN", "AUTHENTICATE")
        if is_login and not self.client_state.login_allowed:
            self.commands.reject_literal()
            self._reject_before_tls(request.tag, None)
            self._close_after_rejected_literal()
        elif is_login and request.binary:
            self.commands.reject_literal()
            self._protocol_error(LITERAL8_LOGIN_ERROR, request.tag)
            self._close_after_rejected_literal()
        else:
            self.client.send(b"+ Ready for literal data\r\n")

    def _reject_oversized_literal(self, error: LiteralTooLarge) -> None:
        """Reply NO [LIMIT] to a login whose announced literal is over a credential limit.

        The session then closes, because the literal's bytes may follow: always for a
        non-synchronizing literal, and from a client that does not wait for "+".
        """
        self.log.info(
            "rejecting a {} whose argument {} was announced as a {}-byte literal: "
            "over the limit of {} bytes",
            error.command,
            error.position + 1,
            error.size,
            error.limit,
        )
        user = error.preceding[0] if error.command == "LOGIN" and error.preceding else None
        named = isinstance(user, (str, bytes)) and len(user) <= MAX_LOGIN_USER_SIZE
        self.record_login("rejected", user if named else None)
        self.client.send(format_tagged(error.tag, "NO", LOGIN_SIZE_ERROR, "LIMIT"))
        if error.fatal:
            raise error
        self._close_after_rejected_literal()

    def _close_after_rejected_literal(self) -> None:
        """Raise a fatal error after a literal got a rejection instead of "+".

        A client that waits for "+" sends no literal, but one that does not wait sends
        it anyway, and it may be a password. Its bytes may arrive in any later read,
        and parsed as commands their first word would come back as a tag. So the session
        closes rather than read on.
        """
        message = "closing after a rejected literal, which may follow unasked"
        raise ClientProtocolError(message, fatal=True)

    def _reject_before_tls(self, tag: str, user: object) -> None:
        self.record_login("rejected", user if isinstance(user, (str, bytes)) else None)
        self.client.send(
            format_tagged(
                tag,
                "NO",
                "Login is disabled until TLS is active; use STARTTLS first",
                "PRIVACYREQUIRED",
            )
        )

    def _pre_auth_caps(self) -> list[str]:
        if self.routes_by_login:
            base: Sequence[str] = capabilities.ROUTING_IMAP_BASE
        else:
            base = self.upstream_caps
        return capabilities.imap_pre_auth(base, self.client_state)

    def _protocol_error(self, message: str, tag: str | None, *, fatal: bool = False) -> None:
        """Send BAD, or close the session when the error budget is used up.

        A fatal error sends BAD and then raises too, because the input is out of sync.
        """
        self.count_client_error(message)
        self.client.send(format_tagged(tag, "BAD", message) if tag else format_untagged("BAD", message))
        if fatal:
            raise ClientProtocolError(message, tag=tag, fatal=True)

    async def _dispatch(self, command: Command) -> bool | None:
        tag, name = command.tag, command.name
        if name in COMMANDS_WITHOUT_ARGUMENTS and command.args:
            self._protocol_error(f"{name} takes no arguments", tag)
        elif name == "CAPABILITY":
            self.client.send(format_capability(self._pre_auth_caps()))
            self.client.send(format_tagged(tag, "OK", "CAPABILITY completed"))
        elif name == "NOOP":
            self.client.send(format_tagged(tag, "OK", "NOOP completed"))
        elif name == "ID":
            self.client.send(b"* ID NIL\r\n")
            self.client.send(format_tagged(tag, "OK", "ID completed"))
        elif name == "LOGOUT":
            self.client.send(format_untagged("BYE", "Logging out"))
            self.client.send(format_tagged(tag, "OK", "LOGOUT completed"))
            return False
        elif name == "STARTTLS":
            await self._starttls(tag)
        elif name in ("LOGIN", "AUTHENTICATE") and not self.client_state.login_allowed:
            self._reject_before_tls(tag, _login_user(command))
        elif name == "LOGIN":
            return await self._login_command(command)
        elif name == "AUTHENTICATE":
            return await self._authenticate(command)
        else:
            self._protocol_error("Command unknown or not valid before login", tag)
        return None

    async def _starttls(self, tag: str) -> None:
        if not self.client_state.starttls_available:
            self.client.send(format_tagged(tag, "BAD", "STARTTLS is not available"))
            return
        self.client.send(format_tagged(tag, "OK", "Begin TLS negotiation now"))
        # Bytes pipelined after STARTTLS were sent in plain text and are never executed.
        self.commands.take_buffered()
        await self.start_client_tls()

    async def _login_command(self, command: Command) -> bool | None:
        # The reader turns the atom NIL into None, but for LOGIN it is the astring "NIL".
        args = [b"NIL" if arg is None else arg for arg in command.args]
        if any(isinstance(arg, Literal8) for arg in args):
            self._protocol_error(LITERAL8_LOGIN_ERROR, command.tag)
            return None
        if len(args) != 2 or not all(_is_string(a) for a in args):
            self._protocol_error("LOGIN needs a user name and a password", command.tag)
            return None
        user, password = (_to_bytes(a) for a in args)
        return await self._start_login(command.tag, user, password)

    async def _authenticate(self, command: Command) -> bool | None:
        tag = command.tag
        if not command.args or not isinstance(command.args[0], str):
            self._protocol_error("AUTHENTICATE needs a mechanism name", tag)
            return None
        if len(command.args) > 2:
            # RFC 4959: a mechanism name and at most an initial response.
            self._protocol_error("AUTHENTICATE takes at most 2 arguments", tag)
            return None
        mechanism = command.args[0].upper()
        initial_argument = command.args[1] if len(command.args) > 1 else None
        if isinstance(initial_argument, Literal8):
            self._protocol_error(LITERAL8_LOGIN_ERROR, tag)
            return None
        if len(command.args) > 1 and not _is_string(initial_argument):
            message = "AUTHENTICATE takes its initial response as a string"
            self._protocol_error(message, tag)
            return None
        initial = _to_bytes(initial_argument) if len(command.args) > 1 else None
        # Rejections stay outside the try, because record_login raises
        # TooManyProtocolErrors at the limit, which the SASL error handler would catch.
        if mechanism not in ("PLAIN", "LOGIN"):
            self.record_login("rejected")
            self.client.send(
                format_tagged(tag, "NO", "Unsupported authentication mechanism", "CANNOT")
            )
            return None
        try:
            if mechanism == "PLAIN":
                if initial is None:
                    response = await self._challenge(b"")
                else:
                    # RFC 4959: "=" stands for an empty initial response.
                    response = b"" if initial == b"=" else initial
                authzid, user, password = sasl.decode_plain(response)
            else:
                authzid = b""
                user, password = await self.read_sasl_login(initial)
        except _Cancelled:
            self.record_login("cancelled")
            # Like a rejected login, a cancelled one waits no delay, so it uses the budget.
            self.count_client_error("authentication cancelled")
            self.client.send(format_tagged(tag, "BAD", "Authentication cancelled"))
            return None
        except ClientProtocolError as exc:
            self.record_login("invalid")
            self._protocol_error(exc.message, tag, fatal=exc.fatal)
            return None
        if authzid and authzid != user:
            self.reject_authorization_identity(authzid, user)
            self._send_authentication_failed(tag)
            return None
        return await self._start_login(tag, user, password)

    async def _challenge(self, data: bytes) -> bytes:
        self.client.send(b"+ " + data + b"\r\n")
        self.commands.expect_continuation_line()
        event = await self.next_client_event(self.commands)
        line = event.data if isinstance(event, ContinuationLine) else b""
        if sasl.is_cancel(line):
            raise _Cancelled
        return line

    # Login toward the upstream

    async def _start_login(
        self, client_tag: str, login: bytes, password: bytes
    ) -> bool | None:
        """Log in upstream, first choosing and connecting the upstream when routing."""
        if self.reject_oversized_login(login, password):
            self.client.send(format_tagged(client_tag, "NO", LOGIN_SIZE_ERROR, "LIMIT"))
            return None
        self.user = decode_login(login)
        await self.delay_login(login)
        self.start_forwarding_login()
        if not self.routes_by_login:
            return await self._login(client_tag, login, password)
        if not self.choose_route(login):
            self._reply_login_failed(client_tag, login)
            return None
        assert self.route is not None
        await self.connect_route(self._setup_upstream)
        result = await self._login(client_tag, self.route.user, password)
        if result is None:
            self.drop_route()
        return result

    def _reply_login_failed(self, client_tag: str, login: bytes) -> None:
        """Fail a login that the appliance does not forward, like a wrong password."""
        self.record_login("failed", login)
        self._send_authentication_failed(client_tag)

    def _send_authentication_failed(self, client_tag: str) -> None:
        self.client.send(
            format_tagged(
                client_tag, "NO", "Authentication failed.", "AUTHENTICATIONFAILED"
            )
        )

    async def _login(self, client_tag: str, user: bytes, password: bytes) -> bool | None:
        assert self.upstream is not None
        caps = {cap.upper() for cap in self.upstream_caps}
        tag = next(self.tags)
        try:
            if "AUTH=PLAIN" in caps:
                pieces = format_authenticate_plain(
                    tag, user, password, sasl_ir="SASL-IR" in caps
                )
            elif "LOGINDISABLED" in caps:
                raise UpstreamError("policy", "server advertises LOGINDISABLED and no AUTH=PLAIN")
            else:
                pieces = format_login(tag, user, password, literal_plus="LITERAL+" in caps)
        except ValueError:
            self.record_login("rejected", self.user)
            self.client.send(format_tagged(client_tag, "NO", "Invalid characters in credentials"))
            return None
        tagged = await self._send_login(tag, pieces)
        return self._finish_login(client_tag, tagged)

    async def _send_login(self, tag: str, pieces: Sequence[bytes]) -> Response:
        assert self.upstream is not None
        queue = list(pieces)
        self.upstream.send(queue.pop(0))
        while True:
            response = await self.next_upstream_event(self.responses)
            if response.kind == "continuation":
                self.upstream.send(queue.pop(0) if queue else b"*\r\n")
            elif _is_reply_to(response, tag):
                return response
            elif response.kind == "untagged":
                self._forward_untagged(response)

    def _forward_untagged(self, response: Response) -> None:
        caps = response_capabilities(response)
        if caps is None:
            self.client.send(response.raw)
        elif response.status is None:
            self.client.send(format_capability(capabilities.imap_post_auth(caps)))
        else:
            self.client.send(
                replace_capability_code(response, capabilities.imap_post_auth(caps))
            )

    def _finish_login(self, client_tag: str, tagged: Response) -> bool | None:
        if tagged.status != "OK":
            self.record_login(refused_login_result(tagged.code), self.user)
            code = tagged.code
            if code and code.upper().startswith("CAPABILITY"):
                code = None
            self.client.send(format_tagged(client_tag, "NO", tagged.text or "Login failed", code))
            return None
        self.record_login("succeeded", self.user)
        caps = response_capabilities(tagged)
        code = tagged.code
        if caps is not None:
            code = "CAPABILITY " + " ".join(capabilities.imap_post_auth(caps))
        self.client.send(format_tagged(client_tag, "OK", tagged.text or "Logged in", code))
        self._flush_pipelined()
        return True

    def _flush_pipelined(self) -> None:
        """Pass on bytes that either side sent after the login reply, before the relay."""
        assert self.upstream is not None
        pending_client = self.commands.take_buffered() + self.client.take_buffer()
        pending_upstream = self.responses.take_buffered() + self.upstream.take_buffer()
        if pending_client:
            self.upstream.send(pending_client)
        if pending_upstream:
            self.client.send(pending_upstream)


def _login_user(command: Command) -> object:
    """Return the user name of a LOGIN, or of an AUTHENTICATE initial response."""
    if not command.args:
        return None
    if command.name == "LOGIN":
        return command.args[0]
    mechanism = command.args[0]
    initial = command.args[1] if len(command.args) > 1 else None
    if not isinstance(mechanism, str) or not _is_string(initial):
        return None
    return sasl.initial_response_user(mechanism.upper(), _to_bytes(initial))


def _is_reply_to(response: Response, tag: str) -> bool:
    """Return whether `response` is the tagged reply to the proxy's command `tag`.

    Raises UpstreamProtocolError for a tagged reply under another tag: the proxy has one
    command in flight, so the reply that it waits for would never come.
    """
    if response.kind != "tagged":
        return False
    if response.tag != tag:
        message = "server sent a tagged reply under a tag the proxy did not send"
        raise UpstreamProtocolError(message)
    return True


def _is_string(value: object) -> bool:
    return isinstance(value, (str, bytes))


def _to_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
