"""The running appliance: listeners, the active config snapshot, signals and shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from appliance.admin import AdminServer
from appliance.config import ListenerConfig, LoadedConfig
from appliance.logs import configure_logging
from appliance.proxy.guard import ClientGuard, MemoryReleaser, raise_open_files_limit
from appliance.proxy.imap_session import ImapSession
from appliance.proxy.listener import BindError, Listener
from appliance.proxy.pop3_session import Pop3Session
from appliance.proxy.session import Session, SessionEnv, Snapshot
from appliance.reload import Reloader, named_file_digests
from appliance.tls.contexts import TlsContextError, build_all_contexts
from appliance.tls.known_servers import KnownServerStore, StateDirError
from appliance.tls.policy import UpstreamPlanner

SESSION_CLASSES: dict[str, type[Session]] = {"imap": ImapSession, "pop3": Pop3Session}


@dataclass
class ReloadStatus:
    """Outcome of the last config load, for logs and the health endpoint."""

    version: int = 1
    """Version of the active config: 1 at start, one more per applied reload."""
    loaded_at: float = 0.0
    """Unix time when the active config took effect."""
    outcome: str = "initial"
    """Outcome of the last reload: initial, applied, unchanged, rejected or failed."""
    detail: str = ""
    """Summary of the last reload: its changes, or the reason it was rejected."""
    last_reload_at: float | None = None
    """Unix time of the last reload whatever its outcome, or None before the first. The
    checks when the file watch starts or restarts count only when they find a change."""


class Runtime:
    """Owns the listeners and the config snapshot that new sessions start with."""

    def __init__(self, snapshot: Snapshot, store: KnownServerStore | None = None) -> None:
        self.snapshot = snapshot
        self.listeners: dict[str, Listener] = {}
        # Listeners that a reload removed or rebound, kept while their sessions run.
        self.retired: list[Listener] = []
        # Without a store, learned TLS modes are kept in memory only.
        self.planner = UpstreamPlanner(snapshot, store)
        self.status = ReloadStatus(version=snapshot.version, loaded_at=time.time())
        # Sessions and failed logins per client address, over all listeners.
        self.memory = MemoryReleaser()
        self.guard = ClientGuard(on_drained=self.memory.request)
        self.stopping = asyncio.Event()

    @property
    def sessions(self) -> list[Session]:
        listeners = [*self.listeners.values(), *self.retired]
        return [s for listener in listeners for s in listener.sessions]

    def make_env(
        self, listener_name: str, snapshot: Snapshot | None = None
    ) -> SessionEnv:
        """Return the env of a new session, with the active snapshot by default."""
        snapshot = snapshot or self.snapshot

        # A session routed by login passes the snapshot with its routed upstream.
        async def plan_upstream(
            name: str, protocol: str, routed: Snapshot | None = None
        ):
            return await self.planner.plan(routed or snapshot, name, protocol)

        def report_upstream(
            protocol, target, connection, error, routed: Snapshot | None = None, log=None
        ) -> None:
            self.planner.report(
                routed or snapshot, protocol, target, connection, error, log=log
            )

        return SessionEnv(
            listener_name=listener_name,
            snapshot=snapshot,
            plan_upstream=plan_upstream,
            report_upstream=report_upstream,
            guard=self.guard,
        )

    def create_listener(
        self, name: str, config: ListenerConfig, snapshot: Snapshot
    ) -> Listener:
        return Listener(name, config, self.make_env, SESSION_CLASSES, snapshot)

    async def start(self) -> None:
        """Bind every listener, then start them all; on any bind failure none starts."""
        pending = {
            name: self.create_listener(name, config, self.snapshot)
            for name, config in self.snapshot.config.listeners.items()
        }
        try:
            for listener in pending.values():
                await listener.bind()
        except BindError:
            for listener in pending.values():
                listener.stop_accepting()
            raise
        for listener in pending.values():
            await listener.start()
        self.listeners = pending

    async def shutdown(self) -> None:
        """Stop accepting, give sessions the grace period, then close the rest."""
        grace = self.snapshot.config.limits.shutdown_grace_period
        for listener in self.listeners.values():
            listener.stop_accepting()
        sessions = self.sessions
        logger.info("shutting down: {} sessions open, grace period {}s", len(sessions), grace)
        tasks = [s.task for s in sessions if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        remaining = [s for s in self.sessions if s.task is not None and not s.task.done()]
        for session in remaining:
            session.shutdown(final=True)
        if remaining:
            await asyncio.wait([s.task for s in remaining], timeout=10)
        logger.info("shutdown complete; sessions closed at the deadline: {}", len(remaining))
        self.memory.cancel()


def build_snapshot(loaded: LoadedConfig, version: int = 1) -> Snapshot:
    return Snapshot(loaded.config, build_all_contexts(loaded.config), version)


async def run_appliance(
    loaded: LoadedConfig,
    *,
    config_arg: str | None = None,
    secrets_dir_arg: str | None = None,
) -> int:
    digests = named_file_digests(loaded)
    try:
        snapshot = build_snapshot(loaded)
    except TlsContextError as exc:
        for problem in exc.problems:
            logger.error("config is invalid: {}", problem)
        return 2
    tls_auto = snapshot.config.tls_auto
    try:
        store = KnownServerStore.open(
            snapshot.config.state_dir, persist=tls_auto.persist_known_servers
        )
    except StateDirError as exc:
        logger.error("{}", exc)
        return 1
    runtime = Runtime(snapshot, store)
    reloader = Reloader(
        runtime,
        loaded,
        config_path=config_arg,
        secrets_dir=secrets_dir_arg,
        digests=digests,
    )
    loop = asyncio.get_running_loop()
    # Installed before the ports accept, so a SIGHUP sent once they do cannot end the
    # process; a request made before the reloader starts waits for it.
    loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
    admin = AdminServer(runtime)
    try:
        await admin.start()
        await runtime.start()
    except BindError as exc:
        await admin.close()
        logger.error("{}", exc)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stopping.set)
    reloader.start()
    count = len(runtime.listeners)
    logger.info("appliance ready with {} listener{}", count, "" if count == 1 else "s")
    await runtime.stopping.wait()
    await reloader.stop()
    await runtime.shutdown()
    await admin.close()
    return 0


def serve(
    loaded: LoadedConfig,
    *,
    config_arg: str | None,
    secrets_dir_arg: str | None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Run the appliance in the foreground until SIGTERM or SIGINT; return the exit code.

    SIGHUP and changes to the watched files reload the config with the same arguments.

    `loop_factory` makes the event loop, such as uvloop's; None uses asyncio's default.
    """
    logging = loaded.config.logging
    configure_logging(logging.level, logging.json_output)
    for warning in loaded.warnings:
        logger.warning("{}", warning)
    logger.info("config loaded from {}", loaded.path or "environment and defaults")
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        loop_module = type(runner.get_loop()).__module__.partition(".")[0]
        logger.info("event loop: {}", loop_module)
        return runner.run(
            run_appliance(
                loaded, config_arg=config_arg, secrets_dir_arg=secrets_dir_arg
            )
        )
