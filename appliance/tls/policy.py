"""Upstream TLS policy: which concrete connections a session may try, in order.

Every plan holds only modes the policy allows, so a session never has to decide on its own
whether plain text is acceptable. Under `tls: auto` without a learned record the order is
implicit TLS, then STARTTLS, then plain text only when `allow_plaintext` is set.
"""

from __future__ import annotations

from appliance.config import AppConfig, UpstreamConfig
from appliance.config.models import default_port
from appliance.proxy.errors import PolicyError
from appliance.proxy.session import Snapshot
from appliance.proxy.upstream import UpstreamTarget


def pinned_mode(config: AppConfig, host: str, port: int | None, protocol: str) -> str | None:
    """Return the mode that a `known_servers` entry fixes for this server, if any."""
    for entry in config.known_servers:
        if entry.host != host:
            continue
        if entry.protocol is not None and entry.protocol != protocol:
            continue
        entry_port = entry.port or default_port(protocol, entry.mode)
        if port is not None and entry_port != port:
            continue
        return entry.mode
    return None


def candidate_modes(upstream: UpstreamConfig) -> list[str]:
    """Return the modes `auto` tries, strongest first."""
    modes = ["implicit", "starttls"]
    if upstream.allow_plaintext:
        modes.append("none")
    return modes


class UpstreamPlanner:
    """Turn an upstream's config (and, later, learned records) into connection targets."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    async def plan(self, snapshot: Snapshot, name: str, protocol: str) -> list[UpstreamTarget]:
        upstream = snapshot.config.upstreams[name]
        modes = [upstream.tls]
        if upstream.tls == "auto":
            pinned = pinned_mode(snapshot.config, upstream.host, upstream.port, protocol)
            modes = [pinned] if pinned else candidate_modes(upstream)
        targets = [self._target(snapshot, name, upstream, mode, protocol) for mode in modes]
        if not targets:
            raise PolicyError("policy", f"upstream {name} has no allowed TLS mode")
        return targets

    @staticmethod
    def _target(
        snapshot: Snapshot, name: str, upstream: UpstreamConfig, mode: str, protocol: str
    ) -> UpstreamTarget:
        return UpstreamTarget(
            name=name,
            host=upstream.host,
            port=upstream.port_for(protocol, mode),
            mode=mode,
            context=snapshot.contexts.upstreams[name],
            server_name=upstream.tls_server_name,
        )
