"""POP3 before login (RFC 1939 AUTHORIZATION state, RFC 2449 CAPA, RFC 2595 STLS,
RFC 5034 AUTH), answered by the proxy; the login itself is re-encoded for the upstream."""

from __future__ import annotations

from appliance.protocols import capabilities, sasl
from appliance.protocols.errors import ClientProtocolError
from appliance.protocols.pop3 import (
    Command,
    CommandReader,
    Continuation,
    Multiline,
    ResponseReader,
    Status,
    StatusResponse,
    format_command,
    format_continuation,
    format_err,
    format_multiline,
    format_ok,
    parse_capa,
    sasl_mechanisms,
)
from appliance.proxy.errors import UpstreamError
from appliance.proxy.session import (
    CLIENT_FAULTS,
    GOODBYE_TEXTS,
    LOGIN_SIZE_ERROR,
    Session,
    decode_login,
    refused_login_result,
)
from appliance.proxy.upstream import UpstreamTarget, open_upstream, upgrade_upstream


# Commands that the proxy replies to itself and that take no arguments (RFC 1939, RFC 2449
# and RFC 2595).
COMMANDS_WITHOUT_ARGUMENTS = frozenset({"CAPA", "STLS", "QUIT"})


class Pop3Session(Session):
    protocol = "pop3"
    pre_auth_state = ("commands", "responses", "greeting", "upstream_caps", "pending_user")

    def goodbye(self, kind: str) -> bytes:
        # SYS/TEMP (RFC 3206): the failure is temporary, so the client retries later.
        code = None if kind in CLIENT_FAULTS else "SYS/TEMP"
        text = GOODBYE_TEXTS[kind]
        return format_err(text, code)

    # Upstream setup

    async def _setup_upstream(self, target: UpstreamTarget) -> None:
        self.upstream = await open_upstream(
            target,
            self.limits.connect_timeout,
            self.upstream_preface(target),
            log=self.log,
        )
        self.responses = ResponseReader(max_line_length=self.limits.max_line_length)
        greeting = await self._status()
        if not greeting.ok:
            raise UpstreamError("greeting", f"{target.address}: server greeting is -ERR")
        self.greeting = greeting
        self.upstream_caps = await self._capa()
        offered = capabilities.has_capability(self.upstream_caps, "STLS")
        if target.mode == "starttls" and not offered:
            raise UpstreamError(
                "starttls", f"{target.address}: server does not offer STLS in CAPA"
            )
        if target.mode != "starttls" and not (target.starttls_if_offered and offered):
            return
        self.upstream.send(format_command("STLS"))
        if not (await self._status()).ok:
            raise UpstreamError("starttls", f"{target.address}: server rejected STLS")
        self.check_no_pending(self.responses, "STLS")
        await upgrade_upstream(self.upstream, target, self.limits.connect_timeout)
        self.upstream_caps = await self._capa()

    async def _status(self) -> StatusResponse:
        self.responses.expect_status()
        event = await self.next_upstream_event(self.responses)
        if isinstance(event, Continuation):
            raise UpstreamError("protocol", "unexpected SASL challenge from server")
        return event.status

    async def _capa(self) -> list[str]:
        assert self.upstream is not None
        self.upstream.send(format_command("CAPA"))
        self.responses.expect_multiline()
        event = await self.next_upstream_event(self.responses)
        if isinstance(event, Multiline):
            return parse_capa(event.lines)
        return []

    # Client side

    async def pre_auth(self) -> bool:
        self.commands = CommandReader(max_line_length=self.limits.max_line_length)
        self.pending_user: bytes | None = None
        if self.routes_by_login:
            # The upstream is chosen at login, so the proxy greets on its own, and
            # without the APOP timestamp that only the upstream could supply.
            self.client.send(format_ok("POP3 proxy ready"))
        else:
            await self.connect_upstream(self._setup_upstream)
            self.client.send(format_ok(self.greeting.text))
        while True:
            try:
                event = await self.next_client_event(self.commands)
            except ClientProtocolError as exc:
                # PASS pairs only with the USER right before it (RFC 1939).
                self.pending_user = None
                self._protocol_error(exc.message, fatal=exc.fatal)
                continue
            if not isinstance(event, Command):
                self._protocol_error("Unexpected continuation line")
                continue
            result = await self._dispatch(event)
            if result is not None:
                return result

    def _protocol_error(self, message: str, *, fatal: bool = False) -> None:
        """Send -ERR, or close the session when the error budget is used up.

        A fatal error sends -ERR and then raises too, because the input is out of sync.
        """
        self.count_client_error(message)
        self.client.send(format_err(message))
        if fatal:
            raise ClientProtocolError(message, fatal=True)

    async def _dispatch(self, command: Command) -> bool | None:
        name = command.name
        if name != "PASS":
            # PASS pairs only with the USER right before it (RFC 1939), so a password
            # never goes out under a user name that the client has moved on from.
            self.pending_user = None
        if name in COMMANDS_WITHOUT_ARGUMENTS and command.argument:
            self._protocol_error(f"{name} takes no arguments")
        elif name == "CAPA":
            if self.routes_by_login:
                base: list[str] = list(capabilities.ROUTING_POP3_BASE)
            else:
                base = self.upstream_caps
            lines = capabilities.pop3_pre_auth(base, self.client_state)
            self.client.send(format_multiline("Capability list follows", lines))
        elif name == "STLS":
            await self._stls()
        elif name == "QUIT":
            self.client.send(format_ok("Logging out"))
            return False
        elif name == "NOOP":
            self.client.send(format_err("NOOP is not valid before login"))
        elif name in ("USER", "PASS", "AUTH", "APOP") and not self.client_state.login_allowed:
            self._reject_before_tls(command)
        elif name == "USER":
            self._user(command)
        elif name == "PASS":
            return await self._pass(command)
        elif name == "AUTH":
            return await self._auth(command)
        elif name == "APOP":
            return await self._apop(command)
        else:
            self._protocol_error("Unknown command or not valid before login")
        return None

    def _reject_before_tls(self, command: Command) -> None:
        """Reject a login command that must wait for TLS, with one log line per attempt.

        A rejected USER is logged with its user name and kept as pending_user, so that
        the PASS right after it is rejected without a second line. That user name never
        reaches the upstream, because every other command clears it, STLS included.
        """
        if command.name != "PASS" or self.pending_user is None:
            self.record_login("rejected", _login_user(command))
        self.pending_user = command.argument if command.name == "USER" else None
        self.client.send(
            format_err("Login is disabled until TLS is active; use STLS first", "AUTH")
        )

    async def _stls(self) -> None:
        if not self.client_state.starttls_available:
            self.client.send(format_err("STLS is not available"))
            return
        self.client.send(format_ok("Begin TLS negotiation"))
        # Bytes pipelined after STLS were sent in plain text and are never executed.
        self.commands.take_buffered()
        await self.start_client_tls()

    def _user(self, command: Command) -> None:
        if not command.argument:
            self.client.send(format_err("USER needs a user name"))
            return
        self.pending_user = command.argument
        self.client.send(format_ok("Send PASS"))

    async def _pass(self, command: Command) -> bool | None:
        if self.pending_user is None:
            self.client.send(format_err("Send USER first"))
            return None
        user, self.pending_user = self.pending_user, None
        return await self._start_login(user, command.argument)

    async def _auth(self, command: Command) -> bool | None:
        if not command.args:
            self.client.send(format_multiline("Mechanisms follow", list(capabilities.PROXY_SASL_MECHANISMS)))
            return None
        mechanism = command.args[0].upper()
        initial = command.args[1] if len(command.args) > 1 else None
        # Rejections stay outside the try, because record_login raises
        # TooManyProtocolErrors at the limit, which the SASL error handler would catch.
        if mechanism not in (b"PLAIN", b"LOGIN"):
            self.record_login("rejected")
            self.client.send(format_err("Unsupported authentication mechanism"))
            return None
        try:
            if mechanism == b"PLAIN":
                if initial is None:
                    response = await self._challenge(b"")
                else:
                    # RFC 5034: "=" stands for an empty initial response.
                    response = b"" if initial == b"=" else initial
                authzid, user, password = sasl.decode_plain(response)
            else:
                authzid = b""
                user, password = await self.read_sasl_login(initial)
        except _Cancelled:
            self.record_login("cancelled")
            # Like a rejected login, a cancelled one waits no delay, so it uses the budget.
            self.count_client_error("authentication cancelled")
            self.client.send(format_err("Authentication cancelled"))
            return None
        except ClientProtocolError as exc:
            self.record_login("invalid")
            self._protocol_error(exc.message)
            return None
        if authzid and authzid != user:
            self.reject_authorization_identity(authzid, user)
            self._send_authentication_failed()
            return None
        return await self._start_login(user, password)

    async def _challenge(self, data: bytes) -> bytes:
        self.client.send(format_continuation(data))
        self.commands.expect_continuation_line()
        event = await self.next_client_event(self.commands)
        line = getattr(event, "data", b"")
        if sasl.is_cancel(line):
            raise _Cancelled
        return line

    async def _apop(self, command: Command) -> bool | None:
        if len(command.args) != 2:
            self.client.send(format_err("APOP needs a user name and a digest"))
            return None
        user, digest = command.args
        if self.reject_oversized_login(user, b""):
            self.client.send(format_err(LOGIN_SIZE_ERROR, "AUTH"))
            return None
        if self.routes_by_login:
            self.record_login("rejected", user)
            self.client.send(format_err("APOP is not available here; use USER or AUTH"))
            return None
        await self.delay_login(user)
        self.user = decode_login(user)
        self.start_forwarding_login()
        self.upstream.send(format_command("APOP", user, digest))
        return await self._finish_login(await self._status_event())

    # Login toward the upstream

    async def _start_login(self, login: bytes, password: bytes) -> bool | None:
        """Log in upstream, first choosing and connecting the upstream when routing."""
        if self.reject_oversized_login(login, password):
            self.client.send(format_err(LOGIN_SIZE_ERROR, "AUTH"))
            return None
        self.user = decode_login(login)
        await self.delay_login(login)
        self.start_forwarding_login()
        if not self.routes_by_login:
            return await self._login(login, password)
        if not self.choose_route(login):
            self._reply_login_failed(login)
            return None
        assert self.route is not None
        await self.connect_route(self._setup_upstream)
        result = await self._login(self.route.user, password)
        if result is None:
            self.drop_route()
        return result

    def _reply_login_failed(self, login: bytes) -> None:
        """Fail a login that the appliance does not forward, like a wrong password."""
        self.record_login("failed", login)
        self._send_authentication_failed()

    def _send_authentication_failed(self) -> None:
        self.client.send(format_err("Authentication failed.", "AUTH"))

    async def _login(self, user: bytes, password: bytes) -> bool | None:
        assert self.upstream is not None
        mechanisms = [m.upper() for m in sasl_mechanisms(self.upstream_caps)]
        if "PLAIN" in mechanisms:
            self.upstream.send(format_command("AUTH", b"PLAIN", sasl.encode_plain(user, password)))
            return await self._finish_login(await self._status_event())
        try:
            # Both are built first, so invalid credentials never leave half a login.
            user_command = format_command("USER", user)
            pass_command = format_command("PASS", password)
        except ValueError:
            # USER and PASS are lines, so a SASL-decoded CR, LF or NUL cannot pass.
            self.record_login("rejected", self.user)
            self.client.send(format_err("Invalid characters in credentials", "AUTH"))
            return None
        self.upstream.send(user_command)
        status = await self._status_event()
        if not status.status.ok:
            return await self._finish_login(status)
        self.upstream.send(pass_command)
        return await self._finish_login(await self._status_event())

    async def _status_event(self) -> Status:
        self.responses.expect_status()
        event = await self.next_upstream_event(self.responses)
        if isinstance(event, Continuation):
            # The server asked for more than PLAIN needs; cancel rather than guess.
            self.upstream.send(b"*\r\n")
            return await self._status_event()
        return event

    async def _finish_login(self, event: Status) -> bool | None:
        status = event.status
        if not status.ok:
            self.record_login(refused_login_result(status.code), self.user)
            self.client.send(format_err(status.text or "Authentication failed", status.code))
            return None
        self.record_login("succeeded", self.user)
        self.client.send(event.raw)
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


def _login_user(command: Command) -> bytes | None:
    """Return the user name of USER or APOP, or of an AUTH initial response."""
    if not command.args:
        return None
    if command.name in ("USER", "APOP"):
        return command.args[0]
    if command.name == "AUTH" and len(command.args) > 1:
        mechanism = command.args[0].decode("ascii", "replace").upper()
        return sasl.initial_response_user(mechanism, command.args[1])
    return None


class _Cancelled(Exception):
    """The client cancelled a SASL exchange with `*`."""
