"""The difference between two configs and the listener sockets it moves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from appliance.config import AppConfig, ListenerConfig
from appliance.files import sha256_regular

# A change to one of these fields needs another socket or another session class.
SOCKET_FIELDS = ("bind", "port", "protocol")
# The diff describes these sections entry by entry and compares every other top-level
# field as a whole.
NAMED_SECTIONS = ("listeners", "upstreams")
# Used once at start (the admin listener, the known-servers store), so a reload only
# records their new value.
RESTART_SECTIONS = ("admin", "state_dir")


@dataclass(frozen=True)
class ConfigDiff:
    """Changes from the active config to a new one: listener actions, plus one readable
    phrase per change for the summary line."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rebound: tuple[str, ...] = ()
    """Listeners whose bind address, port or protocol changed."""
    changes: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.changes

    @property
    def incoming(self) -> tuple[str, ...]:
        """Listeners of the new config that need a new `Listener` object."""
        return self.added + self.rebound

    @property
    def outgoing(self) -> tuple[str, ...]:
        """Listeners of the old config whose `Listener` object stops accepting."""
        return self.removed + self.rebound


def address_of(listener: ListenerConfig) -> str:
    host = f"[{listener.bind}]" if ":" in listener.bind else listener.bind
    return f"{host}:{listener.port}"


def changed_fields(old: BaseModel, new: BaseModel) -> list[str]:
    return [
        name
        for name in type(old).model_fields
        if getattr(old, name) != getattr(new, name)
    ]


def named_files(config: AppConfig) -> dict[str, tuple[Path, ...]]:
    """Return the certificate, key and CA files named by each listener and upstream."""
    files: dict[str, tuple[Path, ...]] = {}
    for name, listener in config.listeners.items():
        paths = (listener.cert_file, listener.key_file)
        files[f"listeners.{name}"] = tuple(p for p in paths if p is not None)
    for name, upstream in config.upstreams.items():
        paths = (upstream.ca_file, upstream.client_cert_file, upstream.client_key_file)
        files[f"upstreams.{name}"] = tuple(p for p in paths if p is not None)
    return files


def file_digests(paths: Iterable[Path]) -> dict[Path, str]:
    """Return the SHA-256 of each file's content, or "unreadable"."""
    digests = {}
    for path in paths:
        try:
            # A FIFO or device reads as "unreadable" instead of blocking the reload.
            digests[path] = sha256_regular(path)
        except OSError:
            digests[path] = "unreadable"
    return digests


def diff_configs(
    old: AppConfig,
    new: AppConfig,
    old_digests: Mapping[Path, str] | None = None,
    new_digests: Mapping[Path, str] | None = None,
) -> ConfigDiff:
    """Compare two configs and the digests of the files they name.

    A file whose path stays the same but whose digest differs counts as a change of the
    listener or upstream that names it, because its TLS context must be built again.
    """
    old_digests = old_digests or {}
    new_digests = new_digests or {}
    new_files = named_files(new)

    def files_changed(key: str) -> bool:
        paths = new_files.get(key, ())
        return any(old_digests.get(p) != new_digests.get(p) for p in paths)

    added, removed, rebound, changes = [], [], [], []
    for name in old.listeners.keys() - new.listeners.keys():
        removed.append(name)
        changes.append(f"listeners.{name} removed")
    for name, listener in new.listeners.items():
        previous = old.listeners.get(name)
        if previous is None:
            added.append(name)
            address = address_of(listener)
            changes.append(f"listeners.{name} added on {address} ({listener.protocol})")
        elif any(getattr(previous, f) != getattr(listener, f) for f in SOCKET_FIELDS):
            rebound.append(name)
            changes.append(
                f"listeners.{name} rebound from {address_of(previous)} "
                f"({previous.protocol}) to {address_of(listener)} ({listener.protocol})"
            )
        elif previous != listener:
            fields = ", ".join(changed_fields(previous, listener))
            changes.append(f"listeners.{name} changed: {fields}")
        elif files_changed(f"listeners.{name}"):
            changes.append(f"listeners.{name} certificate files changed")

    changes += _upstream_changes(old, new, files_changed)
    changes += _section_changes(old, new)
    return ConfigDiff(
        added=tuple(sorted(added)),
        removed=tuple(sorted(removed)),
        rebound=tuple(sorted(rebound)),
        changes=tuple(changes),
    )


def _upstream_changes(old: AppConfig, new: AppConfig, files_changed) -> list[str]:
    changes = []
    for name in sorted(old.upstreams.keys() - new.upstreams.keys()):
        changes.append(f"upstreams.{name} removed")
    for name, upstream in new.upstreams.items():
        previous = old.upstreams.get(name)
        if previous is None:
            changes.append(f"upstreams.{name} added")
        elif previous != upstream:
            fields = ", ".join(changed_fields(previous, upstream))
            changes.append(f"upstreams.{name} changed: {fields}")
        elif files_changed(f"upstreams.{name}"):
            changes.append(f"upstreams.{name} CA or client certificate files changed")
    return changes


def _section_changes(old: AppConfig, new: AppConfig) -> list[str]:
    changes = []
    for section in type(new).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if section in NAMED_SECTIONS or before == after:
            continue
        change = f"{section} changed"
        if isinstance(after, BaseModel):
            change += f": {', '.join(changed_fields(before, after))}"
        if section in RESTART_SECTIONS:
            change += " (takes effect after a restart)"
        changes.append(change)
    return changes


def plan_sockets(
    old: Mapping[str, ListenerConfig],
    new: Mapping[str, ListenerConfig],
    diff: ConfigDiff,
) -> dict[str, str | None]:
    """Map each incoming listener to the outgoing one whose socket it takes over.

    An outgoing socket on exactly the same address is handed over, because a second bind
    of a listening address fails. None means that a new socket must be bound.
    """
    sockets = {address_of(old[name]): name for name in diff.outgoing}
    return {name: sockets.get(address_of(new[name])) for name in diff.incoming}
