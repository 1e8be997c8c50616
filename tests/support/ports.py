"""Free TCP ports for test servers, chosen so that two picks never collide."""

from __future__ import annotations

import random
import socket

# Below Linux's default ephemeral range (32768-60999), so an outgoing connection of the
# appliance or of Dovecot cannot take a port between its pick and the server's bind.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def pick_free_port(host: str = "127.0.0.1") -> int:
    """Return a port that binds on `host` now and that no earlier call returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {PORT_RANGE} on {host}")
