"""The running appliance: listeners, the active config snapshot, signals and shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

from loguru import logger

from appliance.config import LoadedConfig
from appliance.logs import configure_logging
from appliance.proxy.imap_session import ImapSession
from appliance.proxy.listener import BindError, Listener
from appliance.proxy.pop3_session import Pop3Session
from appliance.proxy.session import Session, SessionEnv, Snapshot
from appliance.tls.contexts import TlsContextError, build_all_contexts
from appliance.tls.policy import UpstreamPlanner

SESSION_CLASSES: dict[str, type[Session]] = {"imap": ImapSession, "pop3": Pop3Session}


@dataclass
class ReloadStatus:
    """Outcome of the last config load, for logs and the health endpoint."""

    version: int = 1
    loaded_at: float = 0.0
    outcome: str = "initial"
    detail: str = ""


class Runtime:
    """Owns the listeners and the config snapshot that new sessions start with."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.listeners: dict[str, Listener] = {}
        self.planner = UpstreamPlanner(snapshot)
        self.status = ReloadStatus(version=snapshot.version, loaded_at=time.time())
        self.stopping = asyncio.Event()

    @property
    def sessions(self) -> list[Session]:
        return [s for listener in self.listeners.values() for s in listener.sessions]

    def make_env(self, listener_name: str) -> SessionEnv:
        snapshot = self.snapshot

        async def plan_upstream(name: str, protocol: str):
            return await self.planner.plan(snapshot, name, protocol)

        return SessionEnv(
            listener_name=listener_name,
            snapshot=snapshot,
            plan_upstream=plan_upstream,
        )

    async def start(self) -> None:
        """Bind every listener, then start them all; on any bind failure none starts."""
        pending = {
            name: Listener(name, config, self.make_env, SESSION_CLASSES)
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
        logger.info("shutdown complete; {} sessions were closed at the deadline", len(remaining))


def build_snapshot(loaded: LoadedConfig, version: int = 1) -> Snapshot:
    return Snapshot(loaded.config, build_all_contexts(loaded.config), version)


async def run_appliance(loaded: LoadedConfig) -> int:
    try:
        snapshot = build_snapshot(loaded)
    except TlsContextError as exc:
        logger.error("config is invalid: {}", exc)
        return 2
    runtime = Runtime(snapshot)
    try:
        await runtime.start()
    except BindError as exc:
        logger.error("{}", exc)
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stopping.set)
    logger.info("appliance ready with {} listeners", len(runtime.listeners))
    await runtime.stopping.wait()
    await runtime.shutdown()
    return 0


def serve(loaded: LoadedConfig, *, config_arg: str | None, secrets_dir_arg: str | None) -> int:
    """Run the appliance in the foreground until SIGTERM or SIGINT; return the exit code."""
    logging = loaded.config.logging
    configure_logging(logging.level, logging.json_output)
    for warning in loaded.warnings:
        logger.warning("{}", warning)
    logger.info("config loaded from {}", loaded.path or "environment and defaults")
    return asyncio.run(run_appliance(loaded))
