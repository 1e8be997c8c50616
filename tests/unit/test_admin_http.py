"""Unit tests of the admin listener: request parsing, routing, reports, healthcheck client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from appliance.admin import (
    MAX_CONNECTIONS,
    MAX_REQUEST_HEAD,
    AdminServer,
    BadRequest,
    Request,
    check_health,
    connect_host,
    health_report,
    read_request,
    readiness_report,
)
from appliance.cli import event_loop_factory
from appliance.config import AppConfig
from appliance.metrics import Metrics
from appliance.proxy.runtime import ReloadStatus

GET_METRICS = (
    b"GET /metrics?name=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Accept: application/openmetrics-text\r\n\r\n"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # AppConfig reads APPLIANCE_* variables, so the caller's shell must not leak in.
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


# Request parsing, fed whole, one byte at a time and with trailing bytes


async def parse_fed(chunks: list[bytes]) -> Request:
    reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD)
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return await read_request(reader)


def feeds(data: bytes) -> list[list[bytes]]:
    return [[data], [bytes([b]) for b in data], [data + b"GET /trailing HTTP/1.1\r\n"]]


@pytest.mark.parametrize("feed", range(3), ids=["whole", "bytewise", "trailing"])
async def test_request_parsed_any_split(feed: int) -> None:
    request = await parse_fed(feeds(GET_METRICS)[feed])
    assert request.method == "GET"
    assert request.path == "/metrics"
    assert request.headers["accept"] == "application/openmetrics-text"
    assert request.headers["host"] == "127.0.0.1"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /metrics\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n folded: value\r\n\r\n",
        "GET /m\u00e9trics HTTP/1.1\r\n\r\n".encode(),
    ],
)
@pytest.mark.parametrize("feed", range(3), ids=["whole", "bytewise", "trailing"])
async def test_invalid_request_rejected(head: bytes, feed: int) -> None:
    with pytest.raises(BadRequest) as caught:
        await parse_fed(feeds(head)[feed])
    assert caught.value.status == 400


async def test_oversized_head_rejected() -> None:
    head = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n"
    with pytest.raises(BadRequest) as caught:
        await parse_fed([head])
    assert caught.value.status == 431


async def test_truncated_head_is_end_of_stream() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await parse_fed([b"GET /healthz HTTP/1.1\r\n"])


@given(st.binary(max_size=300))
def test_parser_raises_only_its_errors(data: bytes) -> None:
    try:
        asyncio.run(parse_fed([data + b"\r\n\r\n"]))
    except BadRequest:
        pass


# Reports and routing on a fake runtime


class FakeServer:
    def __init__(self, serving: bool) -> None:
        self.serving = serving

    def is_serving(self) -> bool:
        return self.serving


def two_listener_config(**admin: Any) -> AppConfig:
    return AppConfig(
        listeners={
            "imap": {"protocol": "imap", "port": 1143, "upstream": "mail"},
            "pop3": {"protocol": "pop3", "port": 1110, "upstream": "mail"},
        },
        upstreams={"mail": {"host": "mail.example.org", "tls": "auto"}},
        admin=admin,
    )


def fake_runtime(config: AppConfig, serving: dict[str, bool]) -> Any:
    return SimpleNamespace(
        snapshot=SimpleNamespace(config=config),
        listeners={
            name: SimpleNamespace(server=FakeServer(up)) for name, up in serving.items()
        },
        sessions=[],
        status=ReloadStatus(version=2, loaded_at=1_700_000_000.0, outcome="applied"),
        stopping=asyncio.Event(),
    )


def test_health_ok_when_all_accept() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    healthy, document = health_report(runtime)
    assert healthy
    assert document["detail"] == "listeners accepting: imap, pop3"


def test_health_fails_for_unbound_listener() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True})
    healthy, document = health_report(runtime)
    assert not healthy
    assert document["listeners"]["pop3"] == "not accepting"


def test_health_fails_without_listeners() -> None:
    runtime = fake_runtime(AppConfig(), {})
    healthy, document = health_report(runtime)
    assert not healthy
    assert document["status"] == "fail"
    assert document["detail"] == "no listeners configured"


def test_healthz_503_without_listeners() -> None:
    runtime = fake_runtime(AppConfig(), {})
    server = AdminServer(runtime, Metrics(CollectorRegistry()))
    assert server.respond(Request("GET", "/healthz")).status == 503
    assert server.respond(Request("GET", "/readyz")).status == 503


def test_readiness_fails_while_stopping() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    runtime.stopping.set()
    ready, document = readiness_report(runtime, Metrics(CollectorRegistry()))
    assert not ready
    assert document["detail"] == "shutting down"


def test_readiness_reports_config_and_upstreams() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    meters = Metrics(CollectorRegistry())
    meters.probe_finished("mail", None)
    ready, document = readiness_report(runtime, meters)
    assert ready
    assert document["config"]["version"] == 2
    assert document["config"]["last_reload"] == "applied"
    assert document["upstreams"]["mail"]["reachable"] is False
    assert document["upstreams"]["mail"]["configured_tls"] == "auto"


def test_readiness_upstream_unknown_before_contact() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    _, document = readiness_report(runtime, Metrics(CollectorRegistry()))
    assert document["upstreams"]["mail"]["reachable"] is None


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("HEAD", "/readyz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/", 404),
        ("POST", "/healthz", 405),
    ],
)
def test_routes_answer_status(method: str, path: str, status: int) -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    server = AdminServer(runtime, Metrics(CollectorRegistry()))
    assert server.respond(Request(method, path)).status == status


def test_metrics_negotiates_openmetrics() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    server = AdminServer(runtime, Metrics(CollectorRegistry()))
    request = Request("GET", "/metrics", {"accept": "application/openmetrics-text"})
    response = server.respond(request)
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n")


def test_head_response_has_no_body() -> None:
    runtime = fake_runtime(two_listener_config(), {"imap": True, "pop3": True})
    server = AdminServer(runtime, Metrics(CollectorRegistry()))
    encoded = server.respond(Request("HEAD", "/healthz")).encode(head_only=True)
    assert encoded.endswith(b"\r\n\r\n")
    assert b"Content-Length: 0" not in encoded


# The server on a loopback socket, and the healthcheck client against it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def admin_server() -> AsyncIterator[AdminServer]:
    config = two_listener_config(enabled=True, port=free_port())
    runtime = fake_runtime(config, {"imap": True, "pop3": True})
    server = AdminServer(runtime, Metrics(CollectorRegistry()))
    await server.start()
    yield server
    await server.close()


async def http_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return reply


async def test_server_answers_healthz(admin_server: AdminServer) -> None:
    port = admin_server.config.port
    reply = await http_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(body)["status"] == "ok"


async def test_server_rejects_bad_request(admin_server: AdminServer) -> None:
    reply = await http_exchange(admin_server.config.port, b"BREW /pot\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_idle_connections_cannot_fill_listener(admin_server: AdminServer) -> None:
    port = admin_server.config.port
    idle = [
        await asyncio.open_connection("127.0.0.1", port)
        for _ in range(MAX_CONNECTIONS + 8)
    ]
    try:
        reply = await http_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        for _, writer in idle:
            writer.close()

    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(admin_server.connections) <= MAX_CONNECTIONS


async def test_healthcheck_client_reports_healthy(admin_server: AdminServer) -> None:
    config = admin_server.runtime.snapshot.config
    healthy, reason = await asyncio.to_thread(check_health, config, 3.0)
    assert healthy
    assert reason.startswith("healthy: listeners accepting: imap, pop3")


async def test_healthcheck_client_reports_unhealthy(admin_server: AdminServer) -> None:
    admin_server.runtime.listeners["pop3"].server.serving = False
    config = admin_server.runtime.snapshot.config
    healthy, reason = await asyncio.to_thread(check_health, config, 3.0)
    assert not healthy
    assert "listeners not accepting: pop3" in reason
    assert "returned 503" in reason


def test_healthcheck_without_admin_fails_on_closed_port() -> None:
    config = AppConfig(
        listeners={
            "imap": {"protocol": "imap", "port": free_port(), "upstream": "mail"}
        },
        upstreams={"mail": {"host": "mail.example.org"}},
    )
    healthy, reason = check_health(config, 1.0)
    assert not healthy
    assert reason.startswith("unhealthy: listener imap")


def test_healthcheck_without_listeners_fails() -> None:
    healthy, reason = check_health(AppConfig(), 1.0)
    assert not healthy
    assert "no listeners" in reason


@pytest.mark.parametrize(
    ("bind", "host"),
    [("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("10.0.0.5", "10.0.0.5")],
)
def test_connect_host_maps_wildcards(bind: str, host: str) -> None:
    assert connect_host(bind) == host


# Config of the admin listener


def test_admin_port_conflict_rejected() -> None:
    with pytest.raises(ValueError, match="admin .* both use port 1143"):
        two_listener_config(enabled=True, port=1143)


def test_disabled_admin_port_may_overlap() -> None:
    assert two_listener_config(enabled=False, port=1143).admin.port == 1143


# Event loop selection


def test_event_loop_asyncio_is_default_loop() -> None:
    assert event_loop_factory("asyncio") is None


def test_event_loop_auto_prefers_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert event_loop_factory(None) is uvloop.new_event_loop
    assert event_loop_factory(" AUTO ") is uvloop.new_event_loop


def test_event_loop_unknown_value_rejected() -> None:
    with pytest.raises(ValueError, match="APPLIANCE_EVENT_LOOP='trio' is invalid"):
        event_loop_factory("trio")
