"""Upstream TLS policy: the one concrete connection mode a session may use.

For `tls: implicit`, `starttls` or `none` the mode is the config's. For `tls: auto` the
mode comes from, in this order: a `known_servers` entry in the config, the record in the
known-servers store (learned, or pinned with the `known-servers pin` command), and
finally a probe on first contact, whose result becomes the record. Sessions try only the
recorded mode, so a server once seen with TLS is never reached without TLS: when that
mode fails, the session fails closed and the record stays as it is.

Records move upward on their own only, never down. A background probe of a STARTTLS
record older than `tls_auto.max_record_age`, started by the next session that needs it,
may move it to implicit TLS. A plain-text record moves up through the checks below.

A record of plain text is the one an attacker can plant, by removing STARTTLS from the
server's capabilities or blocking its implicit TLS port during the first probe. So such a
record gets two more checks. A session that the record would reject, or that would send
credentials in plain text, probes again first, at most once per
PLAINTEXT_RECHECK_INTERVAL. A session that may use plain text still upgrades with
STARTTLS when the server offers it, and then a probe moves the record up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import shlex
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from loguru import logger

from appliance import metrics
from appliance.config import AppConfig, UpstreamConfig
from appliance.config.models import default_port
from appliance.proxy.connection import Connection
from appliance.proxy.errors import PolicyError, UpstreamCertificateError, UpstreamError
from appliance.proxy.session import Snapshot
from appliance.proxy.upstream import UpstreamTarget
from appliance.tls.known_servers import (
    KnownServerRecord,
    KnownServerStore,
    ServerKey,
    StoreWriteError,
    utc_now,
)
from appliance.tls.probe import (
    ProbeFunction,
    ProbeReport,
    ProbeSettings,
    certificate_fingerprint,
    mode_strength,
    probe_server,
)

# UpstreamError reasons that an attacker between proxy and server can cause by removing
# or breaking TLS: STARTTLS missing or rejected, a PREAUTH greeting, a failed handshake.
# A certificate that fails verification has reason `tls` too, but it gets its own
# warning, because its fix is the CA file or server name, not forgetting the record.
DOWNGRADE_REASONS = frozenset({"starttls", "preauth", "tls"})
# A successful session refreshes `last_seen` on disk at most this often (seconds).
LAST_SEEN_WRITE_INTERVAL = 3600.0
# Minimum time between two probes of a server recorded as plain text only, started by
# sessions that would rely on the record to refuse the client or to log in (seconds).
PLAINTEXT_RECHECK_INTERVAL = 60.0


def pinned_mode(
    config: AppConfig, host: str, port: int | None, protocol: str
) -> str | None:
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


def probe_age(record: KnownServerRecord) -> float:
    """Return the seconds since the record's last probe.

    A probe time in the future, from a hand edit or a clock that was ahead, counts as
    infinitely old, so that it cannot keep a record from ever being probed again.
    """
    age = (utc_now() - record.last_probed).total_seconds()
    return age if age >= 0 else math.inf


def server_key(upstream: UpstreamConfig, protocol: str) -> ServerKey:
    return ServerKey(protocol, upstream.host, upstream.port)


def record_from_report(
    key: ServerKey, report: ProbeReport, mode: str
) -> KnownServerRecord:
    """Build the record that a probe's chosen `mode` stands for."""
    now = utc_now()
    details = report.mode(mode)
    certificate = details.certificate
    return KnownServerRecord(
        protocol=key.protocol,
        host=key.host,
        port=key.port,
        mode=mode,
        connect_port=details.port,
        first_seen=now,
        last_seen=now,
        last_probed=now,
        fingerprint_sha256=certificate.sha256 if certificate else None,
        tls_version=details.tls_version,
    )


class UpstreamPlanner:
    """Turn an upstream's config and the known-servers store into connection targets.

    Concurrent sessions to a server without a record share one probe. `probe` is
    replaceable for tests.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        store: KnownServerStore | None = None,
        *,
        probe: ProbeFunction = probe_server,
    ) -> None:
        self.snapshot = snapshot
        self.store = store if store is not None else KnownServerStore(None)
        self.probe_count = 0
        self._probe = probe
        self._probes: dict[ServerKey, asyncio.Future[ProbeReport]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_updates: set[ServerKey] = set()
        self._last_write_error: str | None = None

    async def plan(
        self, snapshot: Snapshot, name: str, protocol: str
    ) -> list[UpstreamTarget]:
        """Return the targets a session tries, in order; raise UpstreamError if none."""
        upstream = snapshot.config.upstreams[name]
        if upstream.tls != "auto":
            return [self._target(snapshot, name, upstream, upstream.tls, protocol)]
        mode, learned = await self._auto_mode(snapshot, name, protocol)
        target = self._target(snapshot, name, upstream, mode, protocol)
        if learned and mode == "none":
            target = dataclasses.replace(target, starttls_if_offered=True)
        return [target]

    async def _auto_mode(
        self, snapshot: Snapshot, name: str, protocol: str
    ) -> tuple[str, bool]:
        """Return the mode for `tls: auto`, and whether a probe learned it."""
        upstream = snapshot.config.upstreams[name]
        pinned = pinned_mode(snapshot.config, upstream.host, upstream.port, protocol)
        if pinned:
            return pinned, False
        key = server_key(upstream, protocol)
        record = self.store.get(key)
        if record is None:
            report = await self._shared_probe(snapshot, name, key, None)
            record = self.store.get(key)
            if record is None:
                raise UpstreamError(
                    "probe",
                    f"{key}: the probe reached the server in no mode: {report.summary()}",
                )
        elif self._needs_plaintext_recheck(record):
            logger.info(
                "probing {} again before a session relies on its plain-text record",
                key,
            )
            await self._shared_probe(snapshot, name, key, record)
            record = self.store.get(key) or record
        elif self._is_stale(snapshot, key, record):
            self._start_background_probe(snapshot, name, key, record)
        return self._allowed_mode(upstream, name, record), not record.pinned

    @staticmethod
    def _needs_plaintext_recheck(record: KnownServerRecord) -> bool:
        """Return whether a learned plain-text record is due a probe before use.

        With or without `allow_plaintext`, because a session that may use plain text
        would otherwise send credentials in it for as long as the record lasts.
        """
        if record.mode != "none" or record.pinned:
            return False
        return probe_age(record) >= PLAINTEXT_RECHECK_INTERVAL

    @staticmethod
    def _allowed_mode(
        upstream: UpstreamConfig, name: str, record: KnownServerRecord
    ) -> str:
        if record.mode != "none" or record.pinned or upstream.allow_plaintext:
            return record.mode
        probed = record.last_probed.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise PolicyError(
            "policy",
            f"{record.key} offered no TLS, only plain text, when probed at {probed}. "
            f"Sessions probe it again at most every {PLAINTEXT_RECHECK_INTERVAL:.0f}s. "
            f"tls: auto uses plain text only with upstreams.{name}.allow_plaintext: "
            "true, and then still upgrades with STARTTLS when the server offers it",
        )

    def _is_stale(
        self, snapshot: Snapshot, key: ServerKey, record: KnownServerRecord
    ) -> bool:
        if record.pinned or key in self._probes:
            return False
        return probe_age(record) > snapshot.config.tls_auto.max_record_age

    async def drain(self) -> None:
        """Wait until running probes and store writes have finished."""
        while self._probes or self._tasks:
            pending = [*self._probes.values(), *self._tasks]
            await asyncio.gather(*pending, return_exceptions=True)
            # Lets the done callbacks that remove finished entries run.
            await asyncio.sleep(0)

    # Probing

    async def _shared_probe(
        self,
        snapshot: Snapshot,
        name: str,
        key: ServerKey,
        previous: KnownServerRecord | None,
    ) -> ProbeReport:
        future = self._probes.get(key)
        if future is None:
            future = self._start_probe(snapshot, name, key, previous)
        # A session that gives up must not cancel the probe the others wait for.
        return await asyncio.shield(future)

    def _start_probe(
        self,
        snapshot: Snapshot,
        name: str,
        key: ServerKey,
        previous: KnownServerRecord | None,
    ) -> asyncio.Future[ProbeReport]:
        task = asyncio.ensure_future(
            self._probe_and_learn(snapshot, name, key, previous)
        )
        self._probes[key] = task

        def finished(done: asyncio.Future[ProbeReport]) -> None:
            if self._probes.get(key) is done:
                del self._probes[key]
            if not done.cancelled() and done.exception() is not None:
                logger.opt(exception=done.exception()).error("probe of {} failed", key)

        task.add_done_callback(finished)
        return task

    def _start_background_probe(
        self, snapshot: Snapshot, name: str, key: ServerKey, record: KnownServerRecord
    ) -> None:
        logger.info(
            "probing {} again in the background: its record ({}) is {:.0f}s old",
            key,
            record.mode,
            probe_age(record),
        )
        self._start_probe(snapshot, name, key, record)

    async def _probe_and_learn(
        self,
        snapshot: Snapshot,
        name: str,
        key: ServerKey,
        previous: KnownServerRecord | None,
    ) -> ProbeReport:
        self.probe_count += 1
        logger.info("probing {} for tls: auto (upstream {})", key, name)
        report = await self._probe(_probe_settings(snapshot, name, key))
        chosen = report.chosen_mode()
        metrics.record_probe(name, chosen)
        logger.info(
            "probe of {}: {}; chosen mode: {}",
            key,
            report.summary(),
            chosen or "none reachable",
        )

        if chosen is None:
            if previous is not None:
                await self._write(self.store.update, key, last_probed=utc_now())
            return report
        if chosen != "none" and not report.mode(chosen).usable:
            logger.warning(
                "{} offers {} but it is not usable ({}); sessions fail closed until the "
                "server or upstreams.{} (ca_file, verify, server_name) is fixed",
                key,
                chosen,
                report.mode(chosen).detail,
                name,
            )
        await self._write(self.store.learn, record_from_report(key, report, chosen))
        self._log_change(key, previous, chosen)
        return report

    @staticmethod
    def _log_change(
        key: ServerKey, previous: KnownServerRecord | None, found: str
    ) -> None:
        if previous is None or previous.pinned:
            return
        if mode_strength(found) > mode_strength(previous.mode):
            logger.info(
                "record of {} moved up from {} to {}", key, previous.mode, found
            )
        elif mode_strength(found) < mode_strength(previous.mode):
            logger.warning(
                "probe of {} found only {}, weaker than the recorded {}; this looks like a "
                "downgrade, so the record stays {}",
                key,
                found,
                previous.mode,
                previous.mode,
            )

    # Results of sessions

    def report(
        self,
        snapshot: Snapshot,
        protocol: str,
        target: UpstreamTarget,
        connection: Connection | None,
        error: UpstreamError | None,
        *,
        log: Any = None,
    ) -> None:
        """Take the outcome of one session's upstream setup in `target.mode`.

        `log` is the session's logger, so that warnings carry the session id.
        """
        log = log or logger
        upstream = snapshot.config.upstreams.get(target.name)
        if upstream is None or upstream.tls != "auto":
            return
        key = server_key(upstream, protocol)
        record = self.store.get(key)
        if record is None or record.mode != target.mode:
            return
        if error is None:
            upgraded = connection is not None and connection.tls_info is not None
            if target.mode == "none" and upgraded:
                self._probe_after_upgrade(snapshot, target.name, key, record, log)
            else:
                self._note_success(key, record, connection)
        elif target.starttls_if_offered and error.reason in ("starttls", "tls"):
            # The server offered STARTTLS, but the upgrade failed. A PREAUTH greeting
            # comes before any offer, so it starts no probe.
            self._probe_after_upgrade(snapshot, target.name, key, record, log)
        elif record.mode != "none" and isinstance(error, UpstreamCertificateError):
            log.warning(
                "{} failed TLS in its recorded mode {}: the certificate failed "
                "verification: {}. The session fails closed, and forgetting the record "
                "would not help. If the certificate is the server's own, set "
                "upstreams.{}.ca_file to the CA that issued it or upstreams.{}.server_name "
                "to a name that it contains. If it is not, something between the "
                "appliance and the server presents its own certificate",
                key,
                record.mode,
                # OpenSSL's messages may end with a period.
                error.verify_message.rstrip("."),
                target.name,
                target.name,
            )
        elif record.mode != "none" and error.reason in DOWNGRADE_REASONS:
            log.warning(
                "{} failed in its recorded mode {} ({}); this looks like a downgrade, so "
                "the session fails closed and the record stays {}; if the server really "
                "dropped TLS, run `{}`",
                key,
                record.mode,
                error.detail,
                record.mode,
                self._forget_command(record),
            )

    def _forget_command(self, record: KnownServerRecord) -> str:
        """Return the CLI command that removes this one record and no other.

        Without --port and --protocol, `forget` removes every record of the host.
        """
        port = record.port or record.connect_port
        words = ["appliance", "known-servers", "forget", record.host]
        words += ["--protocol", record.protocol, "--port", str(port)]
        if self.store.path is not None:
            # Absolute, because the operator may run the command from another
            # working folder.
            words += ["--state-dir", str(self.store.path.parent.absolute())]
        return shlex.join(words)

    def _probe_after_upgrade(
        self,
        snapshot: Snapshot,
        name: str,
        key: ServerKey,
        record: KnownServerRecord,
        log: Any,
    ) -> None:
        """Start a probe to move a plain-text record up after a session's STARTTLS."""
        if key in self._probes:
            return
        log.warning(
            "{} offered STARTTLS to a session although its record is plain text; an "
            "attacker may have removed STARTTLS during the probe that made the record. "
            "Probing again",
            key,
        )
        self._start_probe(snapshot, name, key, record)

    def _note_success(
        self, key: ServerKey, record: KnownServerRecord, connection: Connection | None
    ) -> None:
        if key in self._pending_updates:
            return
        changes = _session_changes(key, record, connection, utc_now())
        if not changes:
            return
        self._pending_updates.add(key)
        self._spawn(self._write_update(key, changes))

    async def _write_update(self, key: ServerKey, changes: dict[str, Any]) -> None:
        try:
            await self._write(self.store.update, key, **changes)
        finally:
            self._pending_updates.discard(key)

    # Store writes

    async def _write(self, method: Any, *args: Any, **kwargs: Any) -> None:
        """Run a blocking store write in a thread; a failed write is logged, not raised."""
        try:
            await asyncio.to_thread(method, *args, **kwargs)
        except StoreWriteError as exc:
            message = str(exc)
            if message != self._last_write_error:
                logger.error("known-servers store: {}", message)
            self._last_write_error = message
            return
        if self._last_write_error is not None:
            logger.info("known-servers store: writing works again")
            self._last_write_error = None

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _target(
        snapshot: Snapshot,
        name: str,
        upstream: UpstreamConfig,
        mode: str,
        protocol: str,
    ) -> UpstreamTarget:
        return UpstreamTarget(
            name=name,
            host=upstream.host,
            port=upstream.port_for(protocol, mode),
            mode=mode,
            context=snapshot.contexts.upstreams[name],
            server_name=upstream.tls_server_name,
        )


def _probe_settings(snapshot: Snapshot, name: str, key: ServerKey) -> ProbeSettings:
    upstream = snapshot.config.upstreams[name]
    return ProbeSettings(
        host=upstream.host,
        protocol=key.protocol,
        port=upstream.port,
        context=snapshot.contexts.upstreams[name],
        server_name=upstream.tls_server_name,
        timeout=snapshot.config.tls_auto.probe_timeout,
    )


def _session_changes(
    key: ServerKey,
    record: KnownServerRecord,
    connection: Connection | None,
    now: datetime,
) -> dict[str, Any]:
    """Return the record fields a successful session changes, or {} for none."""
    changes: dict[str, Any] = {}
    tls_info = connection.tls_info if connection is not None else None
    if tls_info is not None and tls_info[0] != record.tls_version:
        changes["tls_version"] = tls_info[0]
    ssl_object = connection.extra("ssl_object") if connection is not None else None
    fingerprint = certificate_fingerprint(ssl_object)
    if fingerprint is not None and fingerprint != record.fingerprint_sha256:
        if record.fingerprint_sha256 is not None:
            logger.info(
                "certificate of {} changed: SHA-256 {} (was {}); fingerprints are "
                "recorded for information and are not pins",
                key,
                fingerprint,
                record.fingerprint_sha256,
            )
        changes["fingerprint_sha256"] = fingerprint
    stale_seen = (now - record.last_seen).total_seconds() > LAST_SEEN_WRITE_INTERVAL
    if changes or stale_seen:
        changes["last_seen"] = now
    return changes
