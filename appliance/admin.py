"""The admin listener: /healthz, /readyz and /metrics over HTTP/1.1 on the appliance's loop.

It is a small asyncio server on purpose: three GET endpoints for probes and Prometheus need
no web framework. Each connection carries one request, and every response closes it. The
request head is bounded in size and time like the mail listeners' pre-login reads.

`check_health` is the client side, used by `appliance healthcheck`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from loguru import logger
from prometheus_client.exposition import choose_encoder

from appliance.config import AppConfig, ListenerConfig
from appliance.config.models import AdminConfig
from appliance.metrics import METRICS, Metrics, iso_time, listener_accepting
from appliance.proxy.listener import BindError

if TYPE_CHECKING:
    from appliance.proxy.runtime import Runtime

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 32
HEALTHCHECK_TIMEOUT = 3.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
JSON_TYPE = "application/json"


class BadRequest(Exception):
    """The request head is not valid HTTP/1.x; `status` is the response code to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    """Header values by lower-case name; a repeated header keeps its last value."""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if head_only else head + self.body


def json_response(status: int, document: dict[str, Any]) -> Response:
    body = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    return Response(status, JSON_TYPE, body)


# Reading requests


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Read one request head; raise BadRequest, or IncompleteReadError at end of stream.

    The reader's limit bounds the head: a longer one raises BadRequest(431).
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request head too long") from None
    return parse_request_head(head)


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and header fields (RFC 9112), ending with an empty line."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "invalid request line")
    method, target, _ = parts
    if not target.startswith("/"):
        raise BadRequest(400, "request target must be an absolute path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "invalid header field")
        headers[name.lower()] = value.strip()
    return Request(method, target.partition("?")[0], headers)


# Reports


def health_report(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    """Return whether every configured listener accepts connections, with details.

    An appliance without listeners accepts nothing, so it is unhealthy too.
    """
    names = list(runtime.snapshot.config.listeners)
    states = {
        name: "accepting" if listener_accepting(runtime, name) else "not accepting"
        for name in names
    }
    failing = [name for name, state in states.items() if state != "accepting"]
    if failing:
        detail = f"listeners not accepting: {', '.join(failing)}"
    elif names:
        detail = f"listeners accepting: {', '.join(names)}"
    else:
        detail = "no listeners configured"
    healthy = bool(names) and not failing
    document = {
        "status": "ok" if healthy else "fail",
        "detail": detail,
        "listeners": states,
    }
    return healthy, document


def readiness_report(runtime: Runtime, metrics: Metrics) -> tuple[bool, dict[str, Any]]:
    """Return whether the appliance should get new clients, with config and upstream state.

    An unreachable upstream does not make the appliance unready. Every replica shares its
    upstreams, so failing readiness would take all of them out of a load balancer, and
    clients would get a refused connection instead of the protocol's "try later" reply.
    """
    healthy, health = health_report(runtime)
    stopping = runtime.stopping.is_set()
    ready = healthy and not stopping
    detail = "shutting down" if stopping else health["detail"]
    status = runtime.status
    config = runtime.snapshot.config
    upstreams = {}
    for name, upstream in config.upstreams.items():
        state = metrics.upstreams.get(name)
        entry = state.as_dict() if state is not None else {"reachable": None}
        entry["configured_tls"] = upstream.tls
        upstreams[name] = entry
    document = {
        "status": "ready" if ready else "not ready",
        "detail": detail,
        "config": {
            "version": status.version,
            "loaded_at": iso_time(status.loaded_at),
            "last_reload": status.outcome,
            "last_reload_detail": status.detail,
            "last_reload_at": iso_time(status.last_reload_at),
        },
        "listeners": health["listeners"],
        "upstreams": upstreams,
    }
    return ready, document


# The server


class AdminServer:
    """Serves /healthz, /readyz and /metrics for one runtime; does nothing when disabled.

    The admin section is read once at start, so a reload that changes it takes effect at
    the next restart.
    """

    def __init__(self, runtime: Runtime, metrics: Metrics = METRICS) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.config: AdminConfig = runtime.snapshot.config.admin
        self.server: asyncio.Server | None = None
        # Open connections, oldest first, each with whether it still waits for its
        # request head.
        self.connections: dict[asyncio.StreamWriter, bool] = {}

    @property
    def address(self) -> str:
        host = f"[{self.config.bind}]" if ":" in self.config.bind else self.config.bind
        return f"{host}:{self.config.port}"

    async def start(self) -> None:
        """Bind and start serving, or raise BindError naming the address."""
        self.metrics.bind_runtime(self.runtime)
        if not self.config.enabled:
            return
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        try:
            self.server = await asyncio.start_server(
                self._serve_connection,
                self.config.bind,
                self.config.port,
                family=family,
                limit=MAX_REQUEST_HEAD,
                reuse_address=True,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise BindError(
                f"admin: cannot listen on {self.address}: {reason}"
            ) from None
        logger.info(
            "admin listener serving /healthz, /readyz, /metrics on {}", self.address
        )

    async def close(self) -> None:
        self.metrics.bind_runtime(None)
        if self.server is None:
            return
        self.server.close()
        self.server = None
        logger.info("admin listener on {} stopped", self.address)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if len(self.connections) >= MAX_CONNECTIONS and not self._drop_idle():
                logger.debug(
                    "admin listener has {} connections; closing a new one",
                    MAX_CONNECTIONS,
                )
                return
            self.connections[writer] = True
            await self._answer(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.connections.pop(writer, None)
            writer.close()

    def _drop_idle(self) -> bool:
        """Abort the oldest connection that has not sent its request; False if none.

        Without this, peers that connect and send nothing would hold every slot for
        REQUEST_TIMEOUT, and a health probe would find the listener full.
        """
        for writer, waiting in self.connections.items():
            if waiting:
                del self.connections[writer]
                writer.transport.abort()
                logger.debug("admin listener is full; dropped its oldest idle connection")
                return True
        return False

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head_only = False
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await read_request(reader)
            if writer in self.connections:
                self.connections[writer] = False
            head_only = request.method == "HEAD"
            response = self._respond_safely(request)
        except asyncio.IncompleteReadError:
            return
        except TimeoutError:
            response = json_response(
                408, {"status": "fail", "detail": "request timed out"}
            )
        except BadRequest as exc:
            response = json_response(exc.status, {"status": "fail", "detail": str(exc)})
        writer.write(response.encode(head_only=head_only))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    def _respond_safely(self, request: Request) -> Response:
        try:
            return self.respond(request)
        except Exception:  # noqa: BLE001 - one broken report must not stop the listener
            logger.opt(exception=True).error("admin request {} failed", request.path)
            return json_response(500, {"status": "fail", "detail": "internal error"})

    def respond(self, request: Request) -> Response:
        """Return the response to one request."""
        if request.path not in ("/healthz", "/readyz", "/metrics"):
            return json_response(404, {"status": "fail", "detail": "not found"})
        if request.method not in ("GET", "HEAD"):
            response = json_response(
                405, {"status": "fail", "detail": "use GET or HEAD"}
            )
            return replace(response, headers=(("Allow", "GET, HEAD"),))
        if request.path == "/metrics":
            return self._metrics(request)
        if request.path == "/healthz":
            ok, document = health_report(self.runtime)
        else:
            ok, document = readiness_report(self.runtime, self.metrics)
        return json_response(200 if ok else 503, document)

    def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, content_type, encoder(self.metrics.registry))


# The client side of `appliance healthcheck`


def check_health(
    config: AppConfig, timeout: float = HEALTHCHECK_TIMEOUT
) -> tuple[bool, str]:
    """Return whether the running appliance is healthy, and a one-line reason.

    With the admin listener enabled this requests its /healthz. Without it, every
    listener must accept a TCP connection. That connection starts a session, which may contact
    the upstream and which logs a client that left before login.
    """
    if config.admin.enabled:
        return _check_admin(config.admin, timeout)
    return _check_listeners(config.listeners, timeout)


def connect_host(bind: str) -> str:
    """Return the address to connect to for a bind address; `0.0.0.0` and `::` mean loopback."""
    if bind == "0.0.0.0":
        return "127.0.0.1"
    if bind == "::":
        return "::1"
    return bind


def _check_admin(admin: AdminConfig, timeout: float) -> tuple[bool, str]:
    host = connect_host(admin.bind)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{admin.port}/healthz"
    # An empty ProxyHandler: HTTP_PROXY from the environment must not see this request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as reply:
            return True, f"healthy: {_detail(reply.read())} ({url})"
    except urllib.error.HTTPError as exc:
        return False, f"unhealthy: {_detail(exc.read())} ({url} returned {exc.code})"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unhealthy: {url} is unreachable: {reason}"


def _detail(body: bytes) -> str:
    try:
        return str(json.loads(body)["detail"])
    except (ValueError, KeyError, TypeError):
        return "no detail in the response"


def _check_listeners(
    listeners: dict[str, ListenerConfig], timeout: float
) -> tuple[bool, str]:
    if not listeners:
        return (
            False,
            "unhealthy: no listeners are configured and the admin listener is off",
        )
    for name, listener in listeners.items():
        host = connect_host(listener.bind)
        try:
            with socket.create_connection((host, listener.port), timeout=timeout):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return (
                False,
                f"unhealthy: listener {name} on {host} port {listener.port}: {reason}",
            )
    return True, f"healthy: listeners accept connections: {', '.join(listeners)}"
