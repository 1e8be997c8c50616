"""CPU cost of a TLS client handshake with and without session resumption, in process.

Both ends run in this process over memory BIOs, so the figures are CPU time without
network waits. The client side is what the appliance pays per upstream connection: with
resumption it also pays for offering a stored session (`wrap_bio(session=...)`) and for
reading the new one back (`SSLObject.session`), which CPython copies through their DER
encoding. Usage: python3 -m benchmarks.tls_handshake [--count N] [--key-type ECDSA|RSA] [--no-verify]
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
from dataclasses import dataclass

import trustme


@dataclass
class Costs:
    """Seconds spent by each side of one connection, and its parts.

    Measured with perf_counter: nothing waits for a network, so this is CPU time unless
    the scheduler preempts the process.
    """

    client: float = 0.0
    server: float = 0.0
    offer_session: float = 0.0
    read_session: float = 0.0
    resumed: int = 0


def _timed(costs: Costs, side: str, call, *args, **kwargs):
    started = time.perf_counter()
    try:
        return call(*args, **kwargs)
    finally:
        setattr(costs, side, getattr(costs, side) + time.perf_counter() - started)


def connect(
    client_context: ssl.SSLContext,
    server_context: ssl.SSLContext,
    session: ssl.SSLSession | None,
    keep_session: bool,
) -> tuple[Costs, ssl.SSLSession | None]:
    """Run one handshake and one server greeting; return the costs and the new session."""
    costs = Costs()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    started = time.perf_counter()
    client = client_context.wrap_bio(
        client_in, client_out, server_hostname="localhost", session=session
    )
    wrapped = time.perf_counter() - started
    costs.client += wrapped
    if session is not None:
        costs.offer_session = wrapped
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    _handshake(costs, client, server, (client_in, client_out), (server_in, server_out))
    # A greeting after the handshake makes the client read the TLS 1.3 session tickets.
    _timed(costs, "server", server.write, b"* OK ready\r\n")
    client_in.write(server_out.read())
    _timed(costs, "client", client.read, 100)
    costs.resumed = int(client.session_reused)
    new_session = None
    if keep_session:
        started = time.perf_counter()
        new_session = client.session
        costs.read_session = time.perf_counter() - started
        costs.client += costs.read_session
    return costs, new_session


def _handshake(
    costs: Costs,
    client: ssl.SSLObject,
    server: ssl.SSLObject,
    client_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO],
    server_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO],
) -> None:
    """Step both sides and carry their records until both handshakes are complete."""
    client_in, client_out = client_bios
    server_in, server_out = server_bios
    client_done = server_done = False
    while not (client_done and server_done):
        if not client_done:
            try:
                _timed(costs, "client", client.do_handshake)
                client_done = True
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        if not server_done:
            try:
                _timed(costs, "server", server.do_handshake)
                server_done = True
            except ssl.SSLWantReadError:
                pass
        client_in.write(server_out.read())


def measure(count: int, key_type: str, verify: bool = True) -> dict[str, Costs]:
    authority = trustme.CA(key_type=trustme.KeyType[key_type])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        authority.configure_trust(client_context)
    else:
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE

    results = {}
    for name, resume in (("full handshake", False), ("resumed", True)):
        total = Costs()
        _, session = connect(client_context, server_context, None, keep_session=True)
        for _ in range(count):
            costs, new_session = connect(
                client_context, server_context, session if resume else None, resume
            )
            if resume:
                session = new_session
            for field in ("client", "server", "offer_session", "read_session"):
                setattr(total, field, getattr(total, field) + getattr(costs, field))
            total.resumed += costs.resumed
        results[name] = total
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.tls_handshake")
    parser.add_argument("--count", type=int, default=300, help="connections per mode")
    parser.add_argument(
        "--key-type",
        choices=("ECDSA", "RSA"),
        default="ECDSA",
        help="key of the test CA and server certificate (trustme's defaults: "
        "ECDSA P-256, RSA 2048 bits)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip certificate verification on the client, as `verify: false` does",
    )
    args = parser.parse_args(argv)
    verification = "without" if args.no_verify else "with"
    print(
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, {args.key_type} "
        f"keys, {verification} verification"
    )
    for name, total in measure(args.count, args.key_type, not args.no_verify).items():
        per = {
            field: getattr(total, field) / args.count * 1e6
            for field in ("client", "server", "offer_session", "read_session")
        }
        print(
            f"{name:>15}: client {per['client']:6.0f} us (offering a session "
            f"{per['offer_session']:.0f}, reading one back {per['read_session']:.0f}), "
            f"server {per['server']:5.0f} us, resumed {total.resumed}/{args.count}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
